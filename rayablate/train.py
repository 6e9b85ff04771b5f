"""Ray Train + DeepSpeed ZeRO training of the concept-ablation matcher and its discriminator.

`train_loop_per_worker(config)` is the plain function `TorchTrainer` runs on every worker: it
loads the pipeline, keeps a frozen teacher copy (eps_0), trains the matcher (eps_theta) and the
latent discriminator with one DeepSpeed engine each, reads data only through
`ray.train.get_dataset_shard("train")`, and reports metrics plus checkpoints (matcher delta +
both engines' DeepSpeed state) through `ray.train.report`. `run_training` is the driver side.

Training rows (a Ray Dataset): `image` (PNG bytes at the pipeline's resolution),
`target_caption` (c*), `anchor_caption` (c; equal to c* on preservation rows), `mask` (1 =
ablation row, 0 = preservation row) and `seed`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import losses as L
from .config import AblationConfig, config_from_dict, to_dict
from .discriminator import LatentDiscriminator
from .files import atomic, write_json
from .pipeline import export_delta, load_pipeline, matcher_state, set_matcher, text_encoders

DELTA_NAME = "matcher_delta.safetensors"
STATE_NAME = "train_state.json"
METRICS_NAME = "train_metrics.json"
COLUMNS = ("image", "target_caption", "anchor_caption", "mask")
TERMS = ("match", "reg", "pres", "con", "adv")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- small pure helpers -----------------------------------------------------------------------

# A worker keeps its data shard in memory when it is at most this large (RAYABLATE_SHARD_CACHE_MB;
# 0 = never): every epoch after the first then shuffles and batches in memory instead of running
# the Ray Data pipeline again (read, re-mask, split). On the toy world that restart cost ~5 s an
# epoch, and an epoch is 6 steps: it was most of the training time.
SHARD_CACHE_MB = float(os.environ.get("RAYABLATE_SHARD_CACHE_MB", "1024"))


def _column_bytes(v) -> int:
    v = np.asarray(v)
    if v.dtype == object:
        return int(sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in v))
    return int(v.nbytes)


class ShardCache:
    """The rows of one worker's shard, in a canonical order (by seed and captions, whatever order
    Ray Data delivered them in), so that an uninterrupted run and a run resumed in a later epoch
    see the same batches. Gives up (and stays empty) past `limit_bytes`."""

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

    def batches(self, batch_size: int, seed: int | None):
        """One epoch: a permutation drawn from `seed` (None: canonical order), in batches."""
        n = len(self.columns["mask"])
        order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in self.columns.items()}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one (rank, step): resumed runs draw the same noise as uninterrupted ones."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


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


def deepspeed_config(cfg: AblationConfig) -> dict:
    """The DeepSpeed config shared by both engines (each gets its own optimizer)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def default_cpus_per_worker(total_cpus: float, num_workers: int) -> float:
    """CPUs to reserve per CPU worker: leave one CPU for Ray Data and the driver (STACK.md: 2 cores
    fit two workers at ~0.49 each), never more than one per worker."""
    per = (total_cpus - 1.0) / num_workers - 0.01 if total_cpus > 1.0 else total_cpus / (num_workers + 1)
    return float(max(0.01, min(1.0, math.floor(per * 100) / 100)))


# --- text conditioning and the denoiser wrapper -----------------------------------------------

class PromptEncoder:
    """Captions -> the UNet's conditioning, as the pipeline builds it at sampling time (SD 1/2, SDXL)."""

    def __init__(self, pipe):
        self.tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
                           if t is not None]
        self.xl = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
        sample = pipe.unet.config.sample_size
        scale = getattr(pipe, "vae_scale_factor", 8)
        sizes = (sample, sample) if isinstance(sample, int) else tuple(sample)
        self.pixel_size = tuple(s * scale for s in sizes)

    def tokenize(self, captions: list[str], device) -> list[torch.Tensor]:
        return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device) for tok in self.tokenizers]

    def encode(self, encoders: list[nn.Module], ids: list[torch.Tensor]):
        """(encoder_hidden_states, added_cond_kwargs or None)."""
        if not self.xl:
            enc = encoders[0]
            return enc(ids[0])[0], None
        hidden, pooled = [], None
        for enc, i in zip(encoders, ids):
            out = enc(i, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        h, w = self.pixel_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=pooled.device, dtype=pooled.dtype).repeat(len(pooled), 1)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


class MatcherModule(nn.Module):
    """A denoiser (UNet + its text encoders) as one module, so one DeepSpeed engine wraps it.

    `forward` takes either token ids (text encoders run inside, for groups that train them) or
    precomputed conditioning.
    """

    def __init__(self, unet: nn.Module, encoders: dict[str, nn.Module], prompts: PromptEncoder):
        super().__init__()
        self.unet = unet
        self.text_encoders = nn.ModuleDict(encoders)
        self.prompts = prompts

    def forward(self, latents, timesteps, encoder_hidden_states=None, added_cond_kwargs=None, input_ids=None):
        if encoder_hidden_states is None:
            encoder_hidden_states, added_cond_kwargs = self.prompts.encode(list(self.text_encoders.values()), input_ids)
        dtype = self.unet.dtype
        if added_cond_kwargs is not None:
            added_cond_kwargs = {k: v.to(dtype) for k, v in added_cond_kwargs.items()}
        return self.unet(latents.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype),
                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]


def _rows(x, idx):
    if x is None or idx is None:
        return x
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    if isinstance(x, list):
        return [v[idx] for v in x]
    return x[idx]


# --- one worker's state: models, objective, engines, checkpoints --------------------------------

class AblationWorker:
    """Everything one training worker holds. Without `init_engines` it runs on plain modules (tests)."""

    def __init__(self, cfg: AblationConfig, model_path: str, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, disc_width: int = 64):
        from diffusers import DDPMScheduler

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[cfg.precision]
        pipe = load_pipeline(model_path)
        self.pipe = pipe
        self.prompts = PromptEncoder(pipe)
        encs = dict(text_encoders(pipe))
        # eps_0: a frozen copy taken before the matcher (or its LoRA adapters) exists.
        self.teacher = MatcherModule(copy.deepcopy(pipe.unet), {n: copy.deepcopy(m) for n, m in encs.items()},
                                     self.prompts)
        self.teacher.requires_grad_(False).eval().to(self.device, self.compute_dtype)
        torch.manual_seed(cfg.seed)  # LoRA factors start identical on every rank
        self.trainable_names = set_matcher(pipe, cfg.param_group, cfg.lora_rank)
        if not self.trainable_names:
            raise ValueError(f"parameter group {cfg.param_group!r} selects no parameter of this pipeline")
        self.base_state = matcher_state(pipe, cfg.param_group)
        self.text_trainable = any(not n.startswith("unet.") for n in self.trainable_names)
        # fp32 CPU copies of the trained components: the delta is written from DeepSpeed's fp32
        # master weights (exact under bf16 and when ZeRO-3 partitions the live parameters).
        trained = {n.split(".", 1)[0] for n in self.trainable_names}
        frozen = {"unet": self.teacher.unet, **self.teacher.text_encoders}  # only their shapes are read
        self.shadow = SimpleNamespace(**{
            c: copy.deepcopy(m).requires_grad_(False).float().cpu() if c in trained else frozen[c]
            for c, m in [("unet", pipe.unet)] + list(encs.items())})
        self.student = MatcherModule(pipe.unet, encs, self.prompts).to(self.device)
        self.student.train()
        self.vae = pipe.vae.requires_grad_(False).eval().to(self.device)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.prediction_type = self.scheduler.config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.disc = None
        if cfg.w_adv > 0:
            torch.manual_seed(cfg.seed + 1)
            self.disc = LatentDiscriminator(pipe.unet.config.in_channels, disc_width).to(self.device)
        # Callables used by the objective; replaced by the DeepSpeed engines in init_engines.
        self.student_fn: Callable = self.student
        self.disc_fn: Callable | None = self.disc
        self.matcher_engine = self.disc_engine = None

    # --- engines ---
    def init_engines(self) -> None:
        import deepspeed

        trainable = [p for p in self.student.parameters() if p.requires_grad]
        ds_cfg = deepspeed_config(self.cfg)
        opt = torch.optim.AdamW(trainable, lr=self.cfg.lr_matcher)
        self.matcher_engine, _, _, _ = deepspeed.initialize(model=self.student, model_parameters=trainable,
                                                            optimizer=opt, config=ds_cfg)
        _load_weights_only(self.matcher_engine)
        self.student_fn = self.matcher_engine
        if self.disc is not None:
            self.disc.to(self.compute_dtype)  # DeepSpeed casts parameters only; spectral norm's buffers too
            dparams = list(self.disc.parameters())
            dopt = torch.optim.Adam(dparams, lr=self.cfg.lr_disc, betas=(0.5, 0.999))
            self.disc_engine, _, _, _ = deepspeed.initialize(model=self.disc, model_parameters=dparams,
                                                             optimizer=dopt, config=ds_cfg)
            _load_weights_only(self.disc_engine)
            self.disc_fn = self.disc_engine

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
        }

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

    # --- the objective ---
    def losses(self, batch: dict, step: int) -> dict:
        """Loss terms of one step (DESIGN.md's table); a term whose weight is 0 is not computed,
        nor is any forward pass only it needs.

        Returns {"total": matcher loss, "disc": discriminator loss or None, "terms": {name: tensor}}.
        """
        cfg, dev = self.cfg, self.device
        gen = torch.Generator(device=dev).manual_seed(step_seed(cfg.seed, self.rank, step))
        torch.manual_seed(step_seed(cfg.seed + 1, self.rank, step))  # dropout, if a model has any
        mask = batch["mask"]
        n = len(mask)
        z0 = self.encode_images(batch["images"], gen)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=gen, device=dev)
        noise = torch.randn(z0.shape, generator=gen, device=dev, dtype=z0.dtype)
        z_t = self.scheduler.add_noise(z0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(z0, noise, t)
        else:
            target = z0
        abl = (mask > 0.5).nonzero().squeeze(1)  # ablation rows, for terms only they take part in
        has_abl = abl.numel() > 0

        need_s_target = cfg.w_match > 0 or cfg.w_pres > 0 or cfg.w_con > 0 or cfg.w_adv > 0
        need_t_anchor = ((cfg.w_match > 0 and cfg.match == "model") or cfg.w_pres > 0 or cfg.w_con > 0
                         or cfg.w_adv > 0)
        need_s_anchor = cfg.w_reg > 0 and has_abl
        need_t_target = cfg.w_con > 0 and has_abl

        ids = {k: self.prompts.tokenize(batch[k], dev) for k in ("target", "anchor")}
        frozen_cond: dict = {}

        def cond(kind):  # teacher text conditioning == student's when no text encoder trains
            if kind not in frozen_cond:
                with torch.no_grad():
                    frozen_cond[kind] = self.prompts.encode(list(self.teacher.text_encoders.values()), ids[kind])
            return frozen_cond[kind]

        def student(kind, idx=None):
            if self.text_trainable:
                return self.student_fn(_rows(z_t, idx), _rows(t, idx), input_ids=_rows(ids[kind], idx)).float()
            h, add = cond(kind)
            return self.student_fn(_rows(z_t, idx), _rows(t, idx), encoder_hidden_states=_rows(h, idx),
                                   added_cond_kwargs=_rows(add, idx)).float()

        @torch.no_grad()
        def teacher(kind, idx=None):
            h, add = cond(kind)
            return self.teacher(_rows(z_t, idx), _rows(t, idx), encoder_hidden_states=_rows(h, idx),
                                added_cond_kwargs=_rows(add, idx)).float()

        s_target = student("target") if need_s_target else None  # eps_theta(c*); eps_theta(c_i) on pres rows
        t_anchor = teacher("anchor") if need_t_anchor else None  # eps_0(c); eps_0(c_i) on pres rows
        zero = torch.zeros((), device=dev)
        terms = {k: zero for k in TERMS}
        if cfg.w_match > 0:
            terms["match"] = (L.match_model_based(s_target, t_anchor, mask) if cfg.match == "model"
                              else L.match_noise_based(s_target, target, mask))
        if need_s_anchor:
            terms["reg"] = L.anchor_regularizer(student("anchor", abl), target[abl])
        if cfg.w_pres > 0:
            terms["pres"] = L.preservation(s_target, t_anchor, mask)
        if need_t_target:
            terms["con"] = L.contrastive_margin(s_target[abl], t_anchor[abl], teacher("target", abl), cfg.margin)
        d_loss = None
        if cfg.w_adv > 0:
            a_t = self.alphas_cumprod[t]
            x0_fake = self._x0(z_t, s_target, a_t)
            x0_real = self._x0(z_t, t_anchor, a_t)
            ddtype = next(self.disc.parameters()).dtype
            # The matcher's loss must not reach the discriminator's parameters (their gradients
            # belong to the discriminator's own engine): freeze them, and call the bare module so
            # that the discriminator engine's backward hooks stay out of the matcher's graph.
            self.disc.requires_grad_(False)
            try:
                fake_logits = self.disc(x0_fake.to(ddtype), t, num_train_timesteps=self.num_train_timesteps)
            finally:
                self.disc.requires_grad_(True)
            terms["adv"] = L.adversarial_generator(fake_logits, mask)
            real = self.disc_fn(x0_real.detach().to(ddtype), t, num_train_timesteps=self.num_train_timesteps)
            fake = self.disc_fn(x0_fake.detach().to(ddtype), t, num_train_timesteps=self.num_train_timesteps)
            d_loss = L.adversarial_discriminator(real, fake, mask)
        weights = {"match": cfg.w_match, "reg": cfg.w_reg, "pres": cfg.w_pres, "con": cfg.w_con, "adv": cfg.w_adv}
        total = sum((weights[k] * terms[k] for k in TERMS if weights[k] > 0), zero)
        if not total.requires_grad:  # e.g. only w_reg > 0 and a batch without ablation rows
            total = total + 0.0 * sum(p.sum() for p in self.student.parameters() if p.requires_grad)
        return {"total": total, "disc": d_loss, "terms": terms, "ablation_rows": float(mask.mean())}

    def apply(self, out: dict) -> None:
        """Backward and optimizer step of both engines."""
        self.matcher_engine.backward(out["total"])
        self.matcher_engine.step()
        if self.disc_engine is not None and out["disc"] is not None:
            self.disc_engine.backward(out["disc"])
            self.disc_engine.step()

    # --- export / hashes / DeepSpeed state ---
    def export(self, path: str | os.PathLike | None, step: int) -> None:
        """Write the matcher delta from the fp32 master weights. Every rank calls this (ZeRO
        gathers are collective); only rank 0 writes when `path` is given."""
        shadow_params = {f"{c}.{n}": p for c, m in vars(self.shadow).items() for n, p in m.named_parameters()}
        module = self.matcher_engine.module if self.matcher_engine is not None else self.student
        with torch.no_grad():
            for qual, p in _student_named_params(module):
                if not p.requires_grad:
                    continue
                full = None
                if self.matcher_engine is not None:
                    from deepspeed.utils import safe_get_full_fp32_param

                    full = safe_get_full_fp32_param(p)
                if full is None:
                    full = p.detach()
                shadow_params[qual].copy_(full.reshape(shadow_params[qual].shape).float().cpu())
        if path is not None and self.rank == 0:
            c = self.cfg.concept
            export_delta(self.shadow, self.cfg.param_group, path, base_state=self.base_state,
                         extra_metadata={"step": str(step), "target": c.target, "anchor": c.anchor,
                                         "param_group": self.cfg.param_group})

    def replica_hash(self) -> str:
        """Hash of this rank's live trainable parameters (matcher + discriminator), for replica checks."""
        h = hashlib.sha256()
        module = self.matcher_engine.module if self.matcher_engine is not None else self.student
        for qual, p in _student_named_params(module):
            if p.requires_grad:
                h.update(qual.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        if self.disc is not None:
            for n, p in self.disc.state_dict().items():
                h.update(n.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_state(self, directory: str, tag: str) -> None:
        self.matcher_engine.save_checkpoint(os.path.join(directory, "ds_matcher"), tag=tag,
                                            exclude_frozen_parameters=True)
        if self.disc_engine is not None:
            self.disc_engine.save_checkpoint(os.path.join(directory, "ds_disc"), tag=tag)

    def load_state(self, directory: str, tag: str) -> None:
        try:
            path, _ = self.matcher_engine.load_checkpoint(os.path.join(directory, "ds_matcher"), tag=tag,
                                                          load_module_strict=False)
            if path is None:
                raise FileNotFoundError(os.path.join(directory, "ds_matcher", tag))
            if self.disc_engine is not None:
                if not os.path.isdir(os.path.join(directory, "ds_disc", tag)):
                    print("[rayablate.train] checkpoint has no discriminator state (w_adv was 0); "
                          "the discriminator starts fresh", flush=True)
                else:
                    self.disc_engine.load_checkpoint(os.path.join(directory, "ds_disc"), tag=tag)
        except Exception as e:
            raise RuntimeError(f"could not restore the DeepSpeed state of checkpoint {directory} (tag {tag}): {e}. "
                               "Resuming needs the same num_workers, zero_stage, precision and param_group as "
                               "the run that wrote it; start a fresh run (resume=False) otherwise.") from e


def weights_only_load(path, map_location=None):
    """torch.load(weights_only=True) of a DeepSpeed checkpoint file: tensors and plain containers,
    plus only DeepSpeed's own state records (loss scaler, ZeRO stage, fragment addresses). A pickle
    that names anything else is refused, so a tampered checkpoint cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _load_weights_only(engine) -> None:
    """DeepSpeed's torch checkpoint engine loads with weights_only=False; make it load with True."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is not None:
        ckpt_engine.load = weights_only_load


def _student_named_params(module: MatcherModule):
    """(qualified pipeline name, parameter) of a MatcherModule: `unet.<...>`, `text_encoder.<...>`."""
    for n, p in module.unet.named_parameters():
        yield f"unet.{n}", p
    for c, enc in module.text_encoders.items():
        for n, p in enc.named_parameters():
            yield f"{c}.{n}", p


# --- the Ray Train worker function --------------------------------------------------------------

def _all_ranks_true(flag: bool, device, world_size: int) -> bool:
    """True when `flag` holds on every rank (a collective: every rank must call it)."""
    if world_size <= 1:
        return flag
    import torch.distributed as dist

    v = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MIN)
    return bool(v.item() > 0.5)


def _device(cfg: AblationConfig) -> torch.device:
    if cfg.use_gpu:
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _quiet_deepspeed() -> None:
    import logging

    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except Exception:
        pass


def train_loop_per_worker(config: dict) -> dict | None:
    """The function `TorchTrainer` runs on each worker (see the module docstring).

    `config`: "ablation" (`to_dict(AblationConfig)`), "model_path" (a local diffusers folder);
    optional "torch_threads" (1), "disc_width" (64), "shuffle_buffer" (rows; 4 x batch_size, 0 =
    off; the first epoch's local shuffle), "shard_cache_mb" (SHARD_CACHE_MB: keep a shard up to this
    size in memory after the first epoch, 0 = stream every epoch), "attempt_counter" (an actor
    counting starts, set by `run_training`),
    "fail_at_step" (fault injection for tests: rank 0 raises once, on the first attempt), "pid_dir"
    (each rank writes rank<N>.pid there), "hold_after_checkpoint" ({"step", "release_file"}: after
    that step's checkpoint every rank waits until the file exists; for tests that kill a worker).

    Reported metrics (rank 0's, averaged since the last report): step, epoch, loss (the matcher's
    weighted total), match, reg, pres, con, adv (0 when the term's weight is 0), disc,
    grad_norm, ablation_rows (share of mask-1 rows), s_per_step.
    Rank 0 returns {"history", "start_step", "final_step", "replica_hashes", "worker_node_ids" (the Ray
    node of each rank), "attempt"}.
    """
    import ray
    import ray.train

    torch.set_num_threads(int(config.get("torch_threads", 1)))
    _quiet_deepspeed()
    cfg = config_from_dict(config["ablation"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg)
    attempt = 1
    counter = config.get("attempt_counter")
    if counter is not None and rank == 0:
        attempt = ray.get(counter.increment.remote())
    log = (lambda msg: print(f"[rayablate.train] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    if config.get("pid_dir"):  # fault-injection tests kill a worker by its pid
        Path(config["pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))

    t_setup = time.time()
    worker = AblationWorker(cfg, config["model_path"], device, rank, world, int(config.get("disc_width", 64)))
    worker.init_engines()

    step, epoch, skip, history = 0, 0, 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads(Path(d, STATE_NAME).read_text())
            worker.load_state(d, state["tag"])
        step, epoch, skip, history = state["step"], state["epoch"], state["batch_in_epoch"], state["history"]
        log(f"resumed from step {step} (epoch {epoch}, batch {skip})")
    start_step = step
    log(f"rank 0 of {world}: setup {time.time() - t_setup:.1f} s; training {cfg.param_group} "
        f"({len(worker.trainable_names)} tensors) for {cfg.steps} steps, ZeRO-{cfg.zero_stage}, {cfg.precision}")

    shard = ray.train.get_dataset_shard("train")
    shuffle = int(config.get("shuffle_buffer", 4 * cfg.batch_size))
    fail_at = config.get("fail_at_step")
    window: list[dict] = []
    t_last = time.time()
    reported_step = step

    def report(with_checkpoint: bool):
        nonlocal window, t_last, reported_step
        metrics = {"step": step, "epoch": epoch}
        for k in dict.fromkeys(k for w in window for k in w):
            metrics[k] = float(np.mean([w[k] for w in window if k in w]))
        metrics["s_per_step"] = (time.time() - t_last) / max(1, step - reported_step)
        history.append(metrics)
        terms = " ".join(f"{k} {metrics.get(k, 0.0):.4g}" for k in TERMS + ("disc",))
        log(f"step {step}/{cfg.steps} loss {metrics.get('loss', float('nan')):.4g} ({terms}) "
            f"{metrics['s_per_step']:.2f} s/step")
        if not with_checkpoint:
            ray.train.report(metrics)
        else:
            tmp = tempfile.mkdtemp(prefix=f"rayablate-ckpt-{step}-r{rank}-")
            try:
                tag = f"step{step:07d}"
                worker.save_state(tmp, tag)
                worker.export(os.path.join(tmp, DELTA_NAME), step)
                if rank == 0:
                    state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "tag": tag,
                             "world_size": world, "history": history, "ablation": config["ablation"]}
                    Path(tmp, STATE_NAME).write_text(json.dumps(state, indent=1))
                from ray.train import Checkpoint

                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{tag}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        window, t_last, reported_step = [], time.time(), step

    batch_in_epoch = skip
    cache = ShardCache(float(config.get("shard_cache_mb", SHARD_CACHE_MB)) * 2**20)
    if epoch > 0 and cache.ok:  # resumed after the first epoch: the cache that run had, rebuilt
        for raw in shard.iter_batches(batch_size=256, batch_format="numpy"):
            cache.add(raw)
        cache.finish()
    while step < cfg.steps:
        seed = step_seed(cfg.seed, rank, 10**6 + epoch) % 2**31  # a new order each epoch, the same on rerun
        collecting = cache.ok and cache.columns is None
        if cache.columns is not None:
            batches = cache.batches(cfg.batch_size, seed if shuffle > 0 else None)
        else:
            kwargs = dict(batch_size=cfg.batch_size, batch_format="numpy", drop_last=False)
            if shuffle > 0:
                kwargs.update(local_shuffle_buffer_size=shuffle, local_shuffle_seed=seed)
            batches = iter(shard.iter_batches(**kwargs))
        batch_in_epoch = 0
        while step < cfg.steps:
            raw = next(batches, None)
            # Ranks stay in lockstep: an epoch ends for all when one shard runs out.
            if not _all_ranks_true(raw is not None, device, world):
                if collecting:  # the rest of this rank's shard belongs in the cache too
                    for rest in ([raw] if raw is not None else []) + list(batches):
                        cache.add(rest)
                    cache.finish()
                break
            if collecting:
                cache.add(raw)
            batch_in_epoch += 1
            if batch_in_epoch <= skip:  # resuming inside an epoch: these batches were trained on
                continue
            if fail_at is not None and step + 1 == int(fail_at) and attempt == 1 and rank == 0:
                raise RuntimeError(f"injected failure before step {step + 1} (fail_at_step)")
            out = worker.losses(worker.batch_tensors(raw), step + 1)
            vals = {"loss": out["total"].detach().float(), **{k: v.detach().float() for k, v in out["terms"].items()}}
            if out["disc"] is not None:
                vals["disc"] = out["disc"].detach().float()
            finite = all(bool(torch.isfinite(v)) for v in vals.values())
            if not _all_ranks_true(finite, device, world):
                shown = ", ".join(f"{k}={float(v):.4g}" for k, v in vals.items())
                where = f"rank {rank}: {shown}" if not finite else f"on another rank (rank {rank}: {shown})"
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {where}")
            worker.apply(out)
            step += 1
            entry = {k: float(v) for k, v in vals.items()}
            entry["ablation_rows"] = out["ablation_rows"]
            gn = worker.matcher_engine.get_global_grad_norm()
            if gn is not None:
                entry["grad_norm"] = float(gn)
            window.append(entry)
            last = step == cfg.steps
            if step % cfg.checkpoint_every == 0 or last:
                report(with_checkpoint=True)
                hold = config.get("hold_after_checkpoint")  # tests: {"step", "release_file"}
                if hold and step == int(hold["step"]):
                    deadline = time.time() + float(hold.get("timeout_s", 300))
                    while not os.path.exists(hold["release_file"]) and time.time() < deadline:
                        time.sleep(0.1)
            elif step % cfg.report_every == 0:
                report(with_checkpoint=False)
        if batch_in_epoch == 0:
            raise RuntimeError(f"the training data shard of rank {rank} is empty: the dataset needs at least "
                               f"{world} rows (one per worker)")
        if step < cfg.steps:
            epoch, skip = epoch + 1, 0

    # Every rank's replica hash and Ray node id, gathered on all (all_gather_object is a collective).
    mine = (worker.replica_hash(), ray.get_runtime_context().get_node_id())
    gathered: list = [mine]
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    hashes = [h for h, _ in gathered]
    if len(set(hashes)) > 1:
        log(f"WARNING: matcher replicas differ across ranks: {hashes}")
    if rank == 0:
        return {"history": history, "start_step": start_step, "final_step": step, "replica_hashes": hashes,
                "worker_node_ids": [n for _, n in gathered], "attempt": attempt}
    return None


# --- driver side --------------------------------------------------------------------------------

def _attempt_counter_cls():
    import ray

    @ray.remote(num_cpus=0)
    class AttemptCounter:
        """Counts how often the training function starts on rank 0 (1 + worker-group restarts)."""

        def __init__(self):
            self.n = 0

        def increment(self) -> int:
            self.n += 1
            return self.n

        def count(self) -> int:
            return self.n

    return AttemptCounter


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def make_trainer(cfg: AblationConfig, train_ds, model_path: str, storage_path: str, run_name: str = "ablate", *,
                 max_failures: int = 0, cpus_per_worker: float | None = None, callbacks: list | None = None,
                 extra_loop_config: dict | None = None, worker_resources: dict | None = None):
    """The `TorchTrainer` of one ablation run (Tune builds its trials from this, adding callbacks).

    `storage_path`: a folder or an s3:// / gs:// URI (an S3 endpoint from AWS_ENDPOINT_URL_S3 is
    honoured, see `storage.py`). `worker_resources`: custom Ray resources each worker needs on top of
    its CPU/GPU, e.g. one that only some node types offer.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cpus_per_worker is None:
        if cfg.use_gpu:
            cpus_per_worker = 1.0
        else:
            if not ray.is_initialized():
                ray.init()
            cpus_per_worker = default_cpus_per_worker(ray.cluster_resources().get("CPU", 1.0), cfg.num_workers)
    resources = {"CPU": cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    resources.update(worker_resources or {})
    loop_config = {"ablation": to_dict(cfg), "model_path": str(model_path),
                   "torch_threads": max(1, int(cpus_per_worker)), "shard_cache_mb": SHARD_CACHE_MB}
    loop_config.update(extra_loop_config or {})
    from ray.data import DataContext

    exec_opts = copy.deepcopy(DataContext.get_current().execution_options)
    exec_opts.preserve_order = True  # the same rows in the same order on rerun: resumes are exact
    from .storage import train_storage

    storage_path, storage_filesystem = train_storage(str(storage_path))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        datasets={"train": train_ds},
        dataset_config=DataConfig(execution_options=exec_opts),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def _raise_worker_error(err: Exception) -> None:
    """Re-raise a failed fit's cause: a FloatingPointError from a worker stays a FloatingPointError."""
    failures = getattr(err, "worker_failures", None) or {}
    for e in list(failures.values()) + [err]:
        m = re.search(r"non-finite loss at step \d+[^\n]*", str(e))
        if isinstance(e, FloatingPointError) or m:
            raise FloatingPointError(m.group(0) if m else str(e)) from err
    raise err


def run_training(cfg: AblationConfig, train_ds, model_path: str, output_dir: str, run_name: str = "ablate",
                 resume: bool = True, *, max_failures: int = 0, cpus_per_worker: float | None = None,
                 callbacks: list | None = None, extra_loop_config: dict | None = None,
                 worker_resources: dict | None = None) -> dict:
    """Train the matcher on `train_ds` with Ray Train; write `<output_dir>/matcher_delta.safetensors`.

    With `resume`, a run whose `storage_path`/`run_name` folder already holds checkpoints continues
    from its latest one (Ray Train V2 restores a run by name and storage path); without it that
    folder is cleared first. Ray retries node preemptions by itself; `max_failures` counts other
    worker errors to retry (deterministic ones, such as a non-finite loss, would only repeat).

    Returns {"delta_path", "metrics" (history), "metrics_path", "checkpoint_path", "run_path",
    "start_step" (of the last attempt: > 0 when it resumed), "final_step", "wall_s", "worker_restarts",
    "replica_hashes" (one per rank: equal when the matcher replicas agree), "worker_node_ids" (the
    Ray node id of each rank)}.
    """
    import ray
    from ray.train.v2.api.exceptions import TrainingFailedError

    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage_path or str(output_dir / "ray")
    if _is_local(storage):
        storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
        run_dir = Path(storage) / run_name
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
    elif not resume:
        run_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not ray.is_initialized():
        ray.init()
    counter = _attempt_counter_cls().remote()
    extra = {"attempt_counter": counter, **(extra_loop_config or {})}
    trainer = make_trainer(cfg, train_ds, model_path, storage, run_name, max_failures=max_failures,
                           cpus_per_worker=cpus_per_worker, callbacks=callbacks, extra_loop_config=extra,
                           worker_resources=worker_resources)
    t0 = time.time()
    try:
        try:
            # Ray Train's own Ctrl-C handler ends the process with exit status 0, as if the run had
            # succeeded; without it Ctrl-C raises KeyboardInterrupt, which the CLI turns into a clean stop.
            trainer._register_sigint_handler = lambda controller: None
            result = trainer.fit()
        except TrainingFailedError as e:
            _raise_worker_error(e)
        if result.error is not None:
            _raise_worker_error(result.error)
        attempts = ray.get(counter.count.remote())
    finally:
        ray.kill(counter)
    wall = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    ret = result.return_value or {}
    delta_path = output_dir / DELTA_NAME
    with result.checkpoint.as_directory() as d, atomic(delta_path) as tmp:
        state = json.loads(Path(d, STATE_NAME).read_text())
        shutil.copyfile(Path(d, DELTA_NAME), tmp)
    history = ret.get("history") or state.get("history", [])
    metrics_path = write_json(output_dir / METRICS_NAME, history)
    return {
        "delta_path": str(delta_path),
        "metrics": history,
        "metrics_path": str(metrics_path),
        "checkpoint_path": result.checkpoint.path,
        "run_path": result.path,
        "start_step": ret.get("start_step"),
        "final_step": ret.get("final_step", state["step"]),
        "wall_s": wall,
        "worker_restarts": max(0, attempts - 1),
        "replica_hashes": ret.get("replica_hashes", []),
        "worker_node_ids": ret.get("worker_node_ids", []),
    }
