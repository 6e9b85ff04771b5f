"""The Ray-free core of one concept ablation: its models, its objective, one training step, its delta.

The method is described, with its formulas, in docs/design.md#the-method. This module runs on one
device with plain torch optimizers; `rayablate.api` drives it in-process and `rayablate.train`
runs the very same code on every Ray Train worker, swapping in DeepSpeed engines (`Ablation.student_fn`
/ `disc_fn` and an optimizer object with the same `step(out)`).

- `Ablation(pipe, cfg)`: the student eps_theta (the pipeline's UNet and text encoders, with the
  matcher group trainable), the frozen teacher eps_0, the latent discriminator, the VAE, the noise
  scheduler and the prompt encoder, built from a pipeline object.
- `Ablation.loss_terms(batch, step)`: the loss terms of one step (calling `losses.py`).
- `PlainOptimizers`: AdamW for the matcher, Adam for the discriminator, gradients clipped at 1.0:
  what the DeepSpeed engines do at ZeRO-0 in fp32.
- `train_step`: losses, the non-finite check, backward and step.
- `ShardCache` + `step_batches`: the rows in a canonical order and a seeded permutation per epoch,
  so the in-process core, an uninterrupted Ray run and a resumed one see the same batches
  (docs/design.md#determinism-and-resume).
- `Ablation.write_delta` / `delta_tensors`: the changed tensors, from fp32 master weights.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import losses as L
from .conditioning import MatcherModule, PromptEncoder
from .config import IMAGE_ANCHORS, AblationConfig
from .discriminator import LatentDiscriminator
from .pipeline import export_delta, matcher_state, set_matcher, text_encoders

COLUMNS = ("image", "target_caption", "anchor_caption", "mask")
CONCEPT_COLUMNS = ("concept", "concept_anchor")  # optional: the concept each row is of (a batch's joint rows)
TERMS = ("match", "reg", "pres", "con", "adv")  # the method's terms; "uncond" and "robust" are added when on
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _same(flag: bool) -> bool:
    return flag


# --- seeds, images, rows --------------------------------------------------------------------------

def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one (rank, step): resumed runs draw the same noise as uninterrupted ones."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one epoch's row order: a new order each epoch, the same on a rerun."""
    return step_seed(seed, rank, 10**6 + epoch) % 2**31


def decode_images(pngs) -> torch.Tensor:
    """PNG bytes -> float tensor Nx3xHxW in [-1, 1]."""
    from .images import decode_png

    arrays = [decode_png(bytes(data)) for data in pngs]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"training images in one batch have different sizes {sorted(shapes)}; the data module must "
                         "render every image at the pipeline's resolution")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def columns_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts -> numpy columns, as Ray Data's `iter_batches(batch_format="numpy")` delivers them."""
    return {k: np.array([r[k] for r in rows], dtype=np.int64 if k in ("mask", "seed") else object)
            for k in rows[0]}


def _column_bytes(v) -> int:
    v = np.asarray(v)
    if v.dtype == object:
        return int(sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in v))
    return int(v.nbytes)


class ShardCache:
    """The training rows of one worker, in a canonical order (by seed and captions, whatever order
    they were delivered in), so that the in-process core, an uninterrupted run and a run resumed in a
    later epoch see the same batches. Gives up (and stays empty) past `limit_bytes`."""

    def __init__(self, limit_bytes: float):
        self.limit, self.nbytes, self.parts = limit_bytes, 0, []
        self.ok = limit_bytes > 0  # False once given up (over the limit, disabled, or an empty shard)
        self.columns: dict | None = None  # set by finish(): the cache is ready

    def add(self, batch: dict) -> None:
        if not self.ok:
            return
        self.nbytes += sum(_column_bytes(v) for v in batch.values())
        if self.nbytes > self.limit:
            self.ok, self.parts = False, []
            return
        self.parts.append({k: np.asarray(v).copy() for k, v in batch.items()})

    def finish(self) -> None:
        if not self.ok or not self.parts:
            self.ok, self.parts = False, []
            return
        cols = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        self.parts = []
        n = len(cols["mask"])
        seeds = cols.get("seed", np.zeros(n))
        key = sorted(range(n), key=lambda i: (str(seeds[i]), str(cols["target_caption"][i]),
                                              str(cols["anchor_caption"][i]),
                                              hashlib.sha1(bytes(cols["image"][i])).hexdigest()))
        self.columns = {k: v[np.asarray(key, dtype=np.int64)] for k, v in cols.items()}

    @classmethod
    def of_ordered(cls, columns: dict) -> "ShardCache":
        """A ready cache of rows already in the canonical order (`data.LocalShards.rank_rows`), so
        they are not sorted and hashed again; no rows: a cache that gave up (`ok` False)."""
        cache = cls(float("inf"))
        if len(columns.get("mask", ())):
            cache.columns = dict(columns)
        else:
            cache.ok = False
        return cache

    def batches(self, batch_size: int, seed: int | None):
        """One epoch: a permutation drawn from `seed` (None: canonical order), in batches."""
        n = len(self.columns["mask"])
        order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in self.columns.items()}


@dataclasses.dataclass
class Position:
    """Where training stands: steps done, the epoch, and the batches of that epoch already used."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def step_batches(cfg: AblationConfig, epoch_batches: Callable[[int], Iterable[dict]], pos: Position,
                 agree: Callable[[bool], bool] = _same, rank: int = 0) -> Iterator[dict]:
    """The raw batch of each step still to train, from `pos` on; the caller adds 1 to `pos.step`
    after each. `epoch_batches(epoch)` gives one epoch's batches; a resumed position skips the
    batches of its epoch that were trained on. `agree(flag)` is True when the flag holds on every
    rank (a collective across workers; itself in one process): an epoch ends for all ranks when
    one shard runs out, so they stay in lockstep."""
    skip = pos.batch_in_epoch
    while pos.step < cfg.steps:
        batches = iter(epoch_batches(pos.epoch))
        pos.batch_in_epoch = 0
        while pos.step < cfg.steps:
            raw = next(batches, None)
            if not agree(raw is not None):
                break
            pos.batch_in_epoch += 1
            if pos.batch_in_epoch <= skip:  # resuming inside an epoch: these batches were trained on
                continue
            yield raw
        if pos.batch_in_epoch == 0:
            raise RuntimeError(f"the training data shard of rank {rank} is empty: the dataset needs at least "
                               "one row per worker")
        if pos.step < cfg.steps:
            pos.epoch, skip = pos.epoch + 1, 0


def _rows(x, idx):
    if x is None or idx is None:
        return x
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    if isinstance(x, list):
        return [v[idx] for v in x]
    return x[idx]


def _conditioning(h, add) -> dict:
    return {"encoder_hidden_states": h, "added_cond_kwargs": add}


def _cat(parts: list):
    """Concatenate rows of tensors, lists of tensors (one per tokenizer) or dicts of tensors (None stays)."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    if isinstance(first, list):
        return [torch.cat([p[j] for p in parts]) for j in range(len(first))]
    return torch.cat(parts)


def _forward(model, z_t, t, requests: list, inputs) -> list:
    """One forward of `model` over the rows of every request (kind, rows) stacked, split back into
    one prediction per request. `inputs(kind, rows)` gives a request's conditioning keywords.
    One call instead of one per request: the UNet's fixed cost per call (module dispatch, DeepSpeed's
    hooks) was most of a small step, and per row the predictions are the same (the UNet mixes no rows)."""
    if not requests:
        return []
    rows = [torch.arange(len(z_t), device=z_t.device) if idx is None else idx for _, idx in requests]
    keywords = [inputs(kind, idx) for (kind, idx) in requests]
    if any(kw.keys() != keywords[0].keys() for kw in keywords):
        raise ValueError(f"requests of one forward need the same conditioning inputs, got {[sorted(kw) for kw in keywords]}")
    out = model(torch.cat([z_t[r] for r in rows]), torch.cat([t[r] for r in rows]),
                **{k: _cat([kw[k] for kw in keywords]) for k in keywords[0]}).float()
    return list(out.split([len(r) for r in rows]))


# --- the models of one ablation -------------------------------------------------------------------

class Ablation:
    """The models of one ablation, built from a pipeline object (see the module docstring).

    The student is the pipeline's own UNet and text encoders (their matcher group made trainable),
    unless `copy_modules`: then it trains copies and `pipe` is left as it was (the in-process API).
    """

    def __init__(self, pipe, cfg: AblationConfig, device: torch.device | str = "cpu", rank: int = 0,
                 disc_width: int = 64, copy_modules: bool = False, world=None):
        from diffusers import DDPMScheduler

        self.cfg, self.rank = cfg, rank
        start = None
        if cfg.init == "closed-form":  # computed from the unchanged pipe: the same on every rank
            from .closed_form import closed_form_edit
            from .worlds import world_for

            start, _ = closed_form_edit(pipe, cfg, world if world is not None else world_for(cfg.model))
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[cfg.precision]
        self.prompts = PromptEncoder(pipe)
        encs = {n: (copy.deepcopy(m) if copy_modules else m) for n, m in text_encoders(pipe)}
        unet = copy.deepcopy(pipe.unet) if copy_modules else pipe.unet
        self.parts = SimpleNamespace(unet=unet, **encs)  # what set_matcher and the delta see
        # eps_0: a frozen copy taken before the matcher (or its LoRA adapters) exists.
        self.teacher = MatcherModule(copy.deepcopy(unet), {n: copy.deepcopy(m) for n, m in encs.items()},
                                     self.prompts)
        self.teacher.requires_grad_(False).eval().to(self.device, self.compute_dtype)
        torch.manual_seed(cfg.seed)  # LoRA factors start identical on every rank
        self.trainable_names = set_matcher(self.parts, cfg.param_group, cfg.lora_rank)
        if not self.trainable_names:
            raise ValueError(f"parameter group {cfg.param_group!r} selects no parameter of this pipeline")
        self.base_state = matcher_state(self.parts, cfg.param_group)
        if start is not None:  # init: closed-form: the student starts from the edit, the teacher stays eps_0
            params = {f"unet.{n}": p for n, p in unet.named_parameters()}
            with torch.no_grad():
                for name, value in start.items():
                    params[name].copy_(value.to(params[name].dtype))
        self.text_trainable = any(not n.startswith("unet.") for n in self.trainable_names)
        self.shadow = self._shadow(encs)
        self.student = MatcherModule(unet, encs, self.prompts).to(self.device)
        self.student.train()
        self.vae = pipe.vae.requires_grad_(False).eval().to(self.device)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.prediction_type = self.scheduler.config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.disc = None
        if cfg.w_adv > 0:
            torch.manual_seed(cfg.seed + 1)
            self.disc = LatentDiscriminator(unet.config.in_channels, disc_width).to(self.device)
        # What the objective calls; the Ray side swaps in its DeepSpeed engines.
        self.student_fn: Callable = self.student
        self.disc_fn: Callable | None = self.disc
        self.robust = None  # robust mode's inner attacker (rayablate.robust)
        if cfg.robust:
            from .robust import InnerAttacker

            self.robust = InnerAttacker(self, self.prompts.tokenizers)

    def _shadow(self, encs: dict) -> SimpleNamespace:
        """fp32 CPU copies of the trained components: the delta is written from fp32 master weights
        (exact under bf16 and when ZeRO-3 partitions the live parameters)."""
        trained = {n.split(".", 1)[0] for n in self.trainable_names}
        frozen = {"unet": self.teacher.unet, **self.teacher.text_encoders}  # only their shapes are read
        return SimpleNamespace(**{
            c: copy.deepcopy(m).requires_grad_(False).float().cpu() if c in trained else frozen[c]
            for c, m in [("unet", self.parts.unet)] + list(encs.items())})

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    # --- data ---
    def batch_tensors(self, batch: dict) -> dict:
        missing = [c for c in COLUMNS if c not in batch]
        if missing:
            raise KeyError(f"training rows lack column(s) {missing}; expected {list(COLUMNS)} (+ seed)")
        return {
            "images": decode_images(batch["image"]).to(self.device),
            "target": [str(c) for c in batch["target_caption"]],
            "anchor": [str(c) for c in batch["anchor_caption"]],
            "mask": torch.tensor(np.asarray(batch["mask"], dtype=np.float32), device=self.device),
            # a batch's joint rows: each row's concept (robust mode's per-concept attacker)
            **{k: [str(c) for c in batch[k]] for k in CONCEPT_COLUMNS if k in batch},
        }

    def anchor_images(self, images: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        """The step's images with an image anchor (anchor_kind blank or noise) in place of every
        ablation row's: a blank (white) canvas, or uniform pixel noise drawn for this (rank, step),
        at the rows' resolution. Other anchor kinds: the images as they are."""
        kind = self.cfg.concept.anchor_kind
        rows = mask > 0.5
        if kind not in IMAGE_ANCHORS or not bool(rows.any()):
            return images
        out = images.clone()
        if kind == "blank":
            out[rows] = 1.0
        else:
            gen = torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.seed + 5, self.rank, step))
            noise = torch.rand(out[rows].shape, generator=gen, device=self.device, dtype=out.dtype)
            out[rows] = noise * 2.0 - 1.0
        return out

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        vc = self.vae.config
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample(generator=gen)
        shift = getattr(vc, "shift_factor", None) or 0.0
        return ((z - shift) * vc.scaling_factor).float()

    def _x0(self, z_t, pred, a_t):
        pred = pred.float()
        if self.prediction_type == "epsilon":
            return L.predicted_x0(z_t, pred, a_t)
        a = a_t.view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * z_t - (1 - a).sqrt() * pred
        return pred  # "sample"

    def _noised(self, images: torch.Tensor, step: int) -> tuple:
        """(z_t, t, the regression target of the plain denoising loss) for one step's images."""
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(step_seed(self.cfg.seed, self.rank, step))
        torch.manual_seed(step_seed(self.cfg.seed + 1, self.rank, step))  # dropout, if a model has any
        z0 = self.encode_images(images, gen)
        t = torch.randint(0, self.num_train_timesteps, (len(z0),), generator=gen, device=dev)
        noise = torch.randn(z0.shape, generator=gen, device=dev, dtype=z0.dtype)
        z_t = self.scheduler.add_noise(z0, noise, t)
        if self.prediction_type == "epsilon":
            return z_t, t, noise
        if self.prediction_type == "v_prediction":
            return z_t, t, self.scheduler.get_velocity(z0, noise, t)
        return z_t, t, z0

    def _predictors(self, batch: dict, z_t, t):
        """students(requests) and teachers(requests): eps_theta / eps_0 for each request of a step, in
        one forward of the matcher and one of the frozen model (see `_forward`). A request is
        (kind, rows): the target, anchor or empty ("uncond") captions on `rows` (None: every row), or
        (("cond", encoder_hidden_states, added_cond_kwargs), rows) for a conditioning given as is."""
        ids = {k: self.prompts.tokenize(batch[k], self.device) for k in ("target", "anchor")}
        ids["uncond"] = self.prompts.tokenize([""] * len(batch["target"]), self.device)  # CFG's other branch
        frozen_cond: dict = {}

        def cond(kind):  # teacher text conditioning == student's when no text encoder trains
            if kind not in frozen_cond:
                with torch.no_grad():
                    frozen_cond[kind] = self.prompts.encode(list(self.teacher.text_encoders.values()), ids[kind])
            return frozen_cond[kind]

        def inputs(kind, idx, trained_text: bool = False) -> dict:
            if isinstance(kind, tuple):  # ("cond", h, add): already the rows' own
                return _conditioning(kind[1], kind[2])
            if trained_text:  # the trained encoder reads the ids
                return {"input_ids": _rows(ids[kind], idx)}
            h, add = cond(kind)
            return _conditioning(_rows(h, idx), _rows(add, idx))

        def students(requests):
            return _forward(self.student_fn, z_t, t, requests, lambda kind, idx: inputs(kind, idx, self.text_trainable))

        @torch.no_grad()
        def teachers(requests):
            return _forward(self.teacher, z_t, t, requests, inputs)

        return students, teachers

    # --- the objective ---
    def loss_terms(self, batch: dict, step: int) -> dict:
        """Loss terms of one step (docs/design.md#the-method); a term whose weight is 0 is not
        computed, nor is any forward pass only it needs.

        Returns {"total": matcher loss, "disc": discriminator loss or None, "terms": {name: tensor},
        "ablation_rows": share of mask-1 rows}.
        """
        cfg = self.cfg
        mask = batch["mask"]
        z_t, t, target = self._noised(self.anchor_images(batch["images"], mask, step), step)
        abl = (mask > 0.5).nonzero().squeeze(1)  # ablation rows, for terms only they take part in
        has_abl = abl.numel() > 0
        # Every rank must run the same matcher forwards (ZeRO-3 gathers parameters in each one, a
        # collective): a batch without ablation rows runs the ablation-only forwards on its first
        # row, weighted 0.
        abl_fwd = abl if has_abl else torch.zeros(1, dtype=torch.long, device=self.device)
        on = 1.0 if has_abl else 0.0
        students, teachers = self._predictors(batch, z_t, t)
        robust = self.robust is not None and cfg.w_robust > 0
        need_t_anchor = ((cfg.w_match > 0 and cfg.match == "model") or cfg.w_pres > 0 or cfg.w_con > 0
                         or cfg.w_adv > 0 or robust)
        need_s_target = cfg.w_match > 0 or cfg.w_pres > 0 or cfg.w_con > 0 or cfg.w_adv > 0
        # eps_0(c*) on the ablation rows, once: negative guidance, the contrastive term and robust
        # mode's margin share it (the margin's rows are abl_fwd, which is abl when there are any)
        need_t_target = (has_abl and (cfg.w_con > 0 or (cfg.w_match > 0 and cfg.match == "model"
                                                        and cfg.negative_guidance > 0))
                         or (robust and cfg.robust_loss != "match"))
        # Every prediction of the step is asked for first, then made in one forward of the matcher and
        # one of the frozen model (`_forward`); the same forwards on every rank (see above).
        s_req, t_req = {}, {}
        if need_s_target:
            s_req["target"] = ("target", None)  # eps_theta(c*); eps_theta(c_i) on pres rows
        if cfg.w_reg > 0:
            s_req["reg"] = ("anchor", abl_fwd)
        if cfg.w_uncond > 0:  # the unconditional prediction of every row stays eps_0(""): guidance amplifies its drift
            s_req["uncond"] = t_req["uncond"] = ("uncond", None)
        if robust:
            h, add = self.robust.conditioning(batch, abl_fwd)
            s_req["robust"] = (("cond", h, add), abl_fwd)
        if need_t_anchor:
            t_req["anchor"] = ("anchor", None)  # eps_0(c); eps_0(c_i) on pres rows
        if need_t_target:
            t_req["target"] = ("target", abl_fwd)
        S = dict(zip(s_req, students(list(s_req.values()))))
        T = dict(zip(t_req, teachers(list(t_req.values()))))
        s_target, t_anchor, t_target = S.get("target"), T.get("anchor"), T.get("target")
        zero = torch.zeros((), device=self.device)
        terms = {k: zero for k in TERMS}
        if cfg.w_match > 0 and cfg.match == "model":
            t_match = t_anchor
            if cfg.negative_guidance > 0 and has_abl:  # ESD's target: away from c*, from the anchor
                t_match = t_anchor.clone()
                t_match[abl] = t_anchor[abl] - cfg.negative_guidance * (t_target - t_anchor[abl])
            terms["match"] = L.match_model_based(s_target, t_match, mask)
        elif cfg.w_match > 0:
            terms["match"] = L.match_noise_based(s_target, target, mask)
        if cfg.w_reg > 0:
            terms["reg"] = on * L.anchor_regularizer(S["reg"], target[abl_fwd])
        if cfg.w_pres > 0:
            terms["pres"] = L.preservation(s_target, t_anchor, mask)
        if cfg.w_con > 0 and has_abl:
            terms["con"] = L.contrastive_margin(s_target[abl], t_anchor[abl], t_target, cfg.margin)
        d_loss = None
        if cfg.w_adv > 0:
            terms["adv"], d_loss = self._adversarial(z_t, t, s_target, t_anchor, mask)
        weights = {"match": cfg.w_match, "reg": cfg.w_reg, "pres": cfg.w_pres, "con": cfg.w_con, "adv": cfg.w_adv}
        if cfg.w_uncond > 0:
            terms["uncond"] = L.preservation(S["uncond"], T["uncond"], torch.zeros_like(mask))
            weights["uncond"] = cfg.w_uncond
        if self.robust is not None:
            weights["pres"] = cfg.w_pres * cfg.robust_pres_scale
            weights["uncond"] = cfg.w_uncond * cfg.robust_pres_scale
        if robust:
            weights["robust"] = cfg.w_robust
            if cfg.robust_loss == "match":
                terms["robust"] = on * L.match_model_based(S["robust"], t_anchor[abl_fwd])
            else:  # "margin": only until the attacked prediction is nearer the anchor than the target
                terms["robust"] = on * L.contrastive_margin(S["robust"], t_anchor[abl_fwd], t_target, cfg.robust_margin)
        total = sum((weights[k] * terms[k] for k in terms if weights[k] > 0), zero)
        if not total.requires_grad:  # e.g. only w_reg > 0 and a batch without ablation rows
            total = total + 0.0 * sum(p.sum() for p in self.trainable_parameters())
        return {"total": total, "disc": d_loss, "terms": terms, "ablation_rows": float(mask.mean())}

    def _adversarial(self, z_t, t, s_target, t_anchor, mask):
        """(the matcher's GAN term, the discriminator's loss) on predicted clean latents."""
        a_t = self.alphas_cumprod[t]
        x0_fake = self._x0(z_t, s_target, a_t)
        x0_real = self._x0(z_t, t_anchor, a_t)
        ddtype = next(self.disc.parameters()).dtype
        n_t = self.num_train_timesteps
        # The matcher's loss must not reach the discriminator's parameters (their gradients belong to
        # the discriminator's own optimizer): freeze them, and call the bare module so that a
        # DeepSpeed engine's backward hooks stay out of the matcher's graph.
        self.disc.requires_grad_(False)
        try:
            fake_logits = self.disc(x0_fake.to(ddtype), t, num_train_timesteps=n_t)
        finally:
            self.disc.requires_grad_(True)
        real = self.disc_fn(x0_real.detach().to(ddtype), t, num_train_timesteps=n_t)
        fake = self.disc_fn(x0_fake.detach().to(ddtype), t, num_train_timesteps=n_t)
        return L.adversarial_generator(fake_logits, mask), L.adversarial_discriminator(real, fake, mask)

    # --- the delta ---
    def named_student_parameters(self):
        """(qualified pipeline name, parameter): `unet.<...>`, `text_encoder.<...>`."""
        for n, p in self.student.unet.named_parameters():
            yield f"unet.{n}", p
        for c, enc in self.student.text_encoders.items():
            for n, p in enc.named_parameters():
                yield f"{c}.{n}", p

    def sync_shadow(self, full_param: Callable | None = None) -> None:
        """Copy the trained values into the fp32 shadow. `full_param(p)` gives a parameter's full
        fp32 master value (DeepSpeed's, under ZeRO and bf16); None or a None result: the live value."""
        shadow_params = {f"{c}.{n}": p for c, m in vars(self.shadow).items() for n, p in m.named_parameters()}
        with torch.no_grad():
            for qual, p in self.named_student_parameters():
                if not p.requires_grad:
                    continue
                full = full_param(p) if full_param is not None else None
                if full is None:
                    full = p.detach()
                shadow_params[qual].copy_(full.reshape(shadow_params[qual].shape).float().cpu())

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """The group's tensors that training changed (full values, LoRA merged), from the shadow."""
        state = matcher_state(self.shadow, self.cfg.param_group)
        return {k: v for k, v in state.items() if not torch.equal(v, self.base_state[k].to(v.dtype))}

    def delta_metadata(self, step: int) -> dict[str, str]:
        c = self.cfg.concept
        meta = {"step": str(step), "target": c.target, "anchor": c.anchor, "anchor_kind": c.anchor_kind, "param_group": self.cfg.param_group}
        if self.cfg.param_group == "lora":  # the rank of the factors, for an exact LoRA export
            meta["lora_rank"] = str(self.cfg.lora_rank)
        return meta

    def write_delta(self, path: str | os.PathLike, step: int) -> None:
        """Write the delta file from the shadow (call `sync_shadow` first)."""
        export_delta(self.shadow, self.cfg.param_group, path, base_state=self.base_state,
                     extra_metadata=self.delta_metadata(step))

    def replica_hash(self) -> str:
        """Hash of the live trainable parameters (matcher + discriminator), for replica checks."""
        h = hashlib.sha256()
        for qual, p in self.named_student_parameters():
            if p.requires_grad:
                h.update(qual.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        if self.disc is not None:
            for n, p in self.disc.state_dict().items():
                h.update(n.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


# --- optimisation ----------------------------------------------------------------------------------

GRADIENT_CLIPPING = 1.0


class PlainOptimizers:
    """The matcher's AdamW and the discriminator's Adam (betas 0.5, 0.999), both clipped at
    GRADIENT_CLIPPING: on one device, what the DeepSpeed engines do at ZeRO-0 in fp32."""

    full_param = None  # the live values are the full fp32 values

    def __init__(self, ablation: Ablation):
        cfg = ablation.cfg
        self.params = ablation.trainable_parameters()
        self.matcher = torch.optim.AdamW(self.params, lr=cfg.lr_matcher)
        self.disc = None
        if ablation.disc is not None:
            self.disc_params = list(ablation.disc.parameters())
            self.disc = torch.optim.Adam(self.disc_params, lr=cfg.lr_disc, betas=(0.5, 0.999))

    def step(self, out: dict) -> float:
        """Backward and step of both optimizers; returns the matcher's gradient norm before clipping."""
        out["total"].backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, GRADIENT_CLIPPING)
        self.matcher.step()
        self.matcher.zero_grad(set_to_none=True)
        if self.disc is not None and out["disc"] is not None:
            out["disc"].backward()
            torch.nn.utils.clip_grad_norm_(self.disc_params, GRADIENT_CLIPPING)
            self.disc.step()
            self.disc.zero_grad(set_to_none=True)
        return float(norm)


def train_step(ablation: Ablation, optimizers, raw: dict, step: int, agree: Callable[[bool], bool] = _same) -> dict:
    """One optimizer step on a raw batch (numpy columns); returns its metrics. A non-finite loss on
    any rank (`agree` is the all-ranks check) raises FloatingPointError naming the step."""
    batch = ablation.batch_tensors(raw)
    if ablation.robust is not None and (step - 1) % ablation.cfg.robust_every == 0:
        ablation.robust.refresh(batch, step, getattr(optimizers, "full_param", None))
    out = ablation.loss_terms(batch, step)
    vals = {"loss": out["total"].detach().float(), **{k: v.detach().float() for k, v in out["terms"].items()}}
    if out["disc"] is not None:
        vals["disc"] = out["disc"].detach().float()
    finite = all(bool(torch.isfinite(v)) for v in vals.values())
    if not agree(finite):
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in vals.items())
        rank = ablation.rank
        where = f"rank {rank}: {shown}" if not finite else f"on another rank (rank {rank}: {shown})"
        raise FloatingPointError(f"non-finite loss at step {step}: {where}")
    grad_norm = optimizers.step(out)
    entry = {k: float(v) for k, v in vals.items()}
    if ablation.robust is not None:
        entry["inner_loss"] = ablation.robust.last_loss
    entry["ablation_rows"] = out["ablation_rows"]
    if grad_norm is not None:
        entry["grad_norm"] = float(grad_norm)
    return entry


def mean_metrics(window: list[dict]) -> dict:
    """The mean of each metric over a window of steps (a metric missing from some steps: over the rest)."""
    return {k: float(np.mean([w[k] for w in window if k in w])) for k in dict.fromkeys(k for w in window for k in w)}
