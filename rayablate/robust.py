"""Robust ablation: an inner attacker inside training, and the rows it adds (docs/design.md#robust-ablation).

Ablation alone erases the *word*: new token embeddings found by textual inversion bring the
concept back (`rayablate.attack`). Robust mode trains the matcher as a min-max problem:

- **inner (attacker)**, every `robust_every` steps, `robust_inner_steps` Adam steps on soft token
  embeddings v placed where the concept's word is in the step's ablation captions (c*(v)):

      v* = argmin_v  E || eps_snap(z_t, c*(v), t) - eps_0(z_t, c*, t) ||^2,   t in [robust_t_min, 1000)

  eps_snap is a frozen snapshot of the *current* matcher (copied from the fp32 master weights, so
  it is exact under ZeRO-3 and bf16), eps_0 the frozen original model: the attacker looks for the
  conditioning under which the edited model denoises as the original did for the concept. It needs
  no reference images, only each worker's own rows. The attacker keeps one set of tokens per start
  in `robust_inits` (the anchor word, the target word, random), as an evaluation attack may start
  from any of them; refreshes take the sets in turn, each warm-started from its own last refresh, so
  over a run each is trained for longer than an evaluation attack. (One anchor-started set left
  target-started inversions at 56 % on zorb; the three sets took it to 19 %, measured in-process.)
- **outer (defender)**: the usual objective plus, on the ablation rows,

      w_robust * || eps_theta(z_t, c*(v*), t) - sg(eps_0(z_t, c, t)) ||^2

  so under the adversarial conditioning the model draws the anchor. Preservation, the anchor
  regularizer and the CLIP-masked rows keep everything else where it was.

A batch's joint run trains one matcher on many concepts' rows (`robust_per_concept`): the attacker
then keeps its sets per concept, keyed by each row's `concept` column and started from that
concept's own words, so each refresh searches for tokens that bring back one concept, as an
evaluation attack does, and each row of the outer term is defended against its own concept's
tokens. One set shared by every concept (started from the first concept's words) left the toy
joint model of striped + zorb at 38 % / 50 % under a target-started inversion; per concept, 22 % / 22 %.

The attacker's state (its vectors) is part of every checkpoint, one file per rank, so resume is exact.
"""
from __future__ import annotations

import copy
import difflib
import zlib

import torch

from .soft_tokens import SoftTokens, denoising_loss

STATE_FILE = "robust_rank{}.pt"
TEACHER_ROWS = 64  # rows per forward of the frozen model for the inner steps' goals (see `_inner`)


def adversarial_caption(target: str, anchor: str, text: str) -> str:
    """The target caption with the words it does not share with its anchor caption (the concept's
    words) replaced by `text`; `text` prefixed when they share every word."""
    if anchor.startswith(target) and anchor != target:  # the anchor was appended ("a painting, plain")
        return f"{target} {text}"
    tw, aw = target.split(), anchor.split()
    ops = [op for op in difflib.SequenceMatcher(a=tw, b=aw, autojunk=False).get_opcodes() if op[0] != "equal"]
    if not ops:
        return f"{text} {target}"
    _, i1, i2, _, _ = ops[0]  # i1 == i2: the anchor only added words there ("..., plain")
    return " ".join(tw[:i1] + [text] + tw[i2:])


class _Sets:
    """One concept's soft tokens: a set per start in `robust_inits`, the one refreshed last, how
    often the concept was refreshed, and the anchor word its anchor-started set began from."""

    def __init__(self, softs: list[SoftTokens], anchor: str):
        self.softs, self.anchor, self.current, self.refreshes = softs, anchor, 0, 0

    @property
    def soft(self) -> SoftTokens:
        return self.softs[self.current]


class InnerAttacker:
    """The inner loop of robust ablation on one worker (see the module docstring).

    `robust_per_concept` (a batch's joint run): one `_Sets` per concept, keyed by each row's
    `concept` column (its concept's target word; `concept_anchor` its anchor word, both written by
    the batch's joint rows; without them every row is the run's own concept), so an attack is
    searched and defended per concept, each set started from its own concept's words; a refresh
    takes the step's `robust_concepts_per_refresh` least refreshed concepts, each on its own rows
    only. Otherwise one `_Sets`
    (key None) serves every row, started from the run's concept, and refreshes take its starts in
    turn by step."""

    def __init__(self, ablation, tokenizers):
        cfg = ablation.cfg
        self.ablation, self.cfg, self.tokenizers = ablation, cfg, tokenizers
        teacher = ablation.teacher
        # The snapshot: the teacher's architecture, refreshed with the matcher's current values.
        self.snapshot_unet = copy.deepcopy(teacher.unet).requires_grad_(False)
        self.encoders = list(teacher.text_encoders.values())  # frozen: robust mode trains UNet groups only
        self.per_concept = bool(cfg.robust_per_concept)
        self.sets: dict[str | None, _Sets] = {}
        if not self.per_concept:
            self.sets[None] = self._make(cfg.concept.target, cfg.concept.anchor, 0)
        self._snap_params = dict(self.snapshot_unet.named_parameters())
        self.last_loss = float("nan")
        self.last_key: str | None = None  # the concept refreshed last (per-concept mode)

    def _make(self, target: str, anchor: str, offset: int) -> _Sets:
        cfg, rank = self.cfg, self.ablation.rank
        words = {"anchor": [anchor] if anchor else [], "target": [target] if target else [], "random": []}
        return _Sets([SoftTokens(self.tokenizers, self.encoders, cfg.robust_vectors, words[init],
                                 seed=cfg.seed + 7919 * (rank + 1) + 104729 * k + offset, device=self.ablation.device)
                      for k, init in enumerate(cfg.robust_inits)], anchor)

    def _sets_for(self, key: str, anchor: str) -> _Sets:
        """A concept's sets, made on first sight (seeded by the concept's word, so the order in which
        concepts appear does not matter)."""
        if key not in self.sets:
            self.sets[key] = self._make(key, anchor, 1 + zlib.crc32(key.encode()) % 2**30)
        return self.sets[key]

    def row_keys(self, batch: dict, idx) -> list[str | None]:
        """Each row's concept (None: the one set of a shared attacker), its sets made on first sight."""
        if not self.per_concept:
            return [None] * len(idx)
        c = self.cfg.concept
        if "concept" not in batch:
            keys = [c.target] * len(idx)
            anchors = [c.anchor] * len(idx)
        else:
            keys = [batch["concept"][i] for i in idx.tolist()]
            anchors = [batch["concept_anchor"][i] for i in idx.tolist()]
        for key, anchor in zip(keys, anchors):
            self._sets_for(key, anchor)
        return keys

    # --- the snapshot ---
    def refresh_snapshot(self, full_param=None) -> None:
        """Copy the matcher's current values (fp32 masters; a collective under ZeRO-3) into the snapshot."""
        from .pipeline import matcher_state

        ab = self.ablation
        ab.sync_shadow(full_param)
        with torch.no_grad():
            for name, value in matcher_state(ab.shadow, self.cfg.param_group).items():
                p = self._snap_params[name.split(".", 1)[1]]
                p.copy_(value.to(p.device, p.dtype))

    def _cond(self, soft: SoftTokens, captions, grad: bool):
        ids = soft.tokenize(captions, self.ablation.device)
        with torch.set_grad_enabled(grad), soft.installed(self.encoders):
            return self.ablation.prompts.encode(self.encoders, ids)

    @staticmethod
    def captions(soft: SoftTokens, batch: dict, idx) -> list[str]:
        return [adversarial_caption(batch["target"][i], batch["anchor"][i], soft.text) for i in idx.tolist()]

    # --- the inner loop ---
    def refresh(self, batch: dict, step: int, full_param=None) -> None:
        """Snapshot the matcher, then `robust_inner_steps` Adam steps against it on this step's
        ablation rows, seeded by (seed, rank, step), on one of the sets of soft tokens in turn. Per
        concept: for the step's `robust_concepts_per_refresh` least refreshed concepts (0: all), each
        on its own rows with its own sets."""
        from .method import step_seed

        ab, cfg = self.ablation, self.cfg
        if not self.per_concept:
            self.sets[None].current = ((step - 1) // cfg.robust_every) % len(cfg.robust_inits)
        self.refresh_snapshot(full_param)  # on every rank, rows or not: it can be a collective
        abl = (batch["mask"] > 0.5).nonzero().squeeze(1)
        if abl.numel() == 0:
            return
        dev = ab.device
        gen = torch.Generator(device=dev).manual_seed(step_seed(cfg.seed + 3, ab.rank, step))
        z0 = ab.encode_images(batch["images"], gen)
        if not self.per_concept:
            self._inner(self.sets[None].soft, batch, abl, z0, gen)
            return
        keys = self.row_keys(batch, abl)
        # the least refreshed concepts of this step; ties by the words, so every rank's choice is reproducible
        order = sorted(dict.fromkeys(keys), key=lambda k: (self.sets[k].refreshes, k))
        n = cfg.robust_concepts_per_refresh or len(order)
        for key in order[:n]:
            sets = self.sets[key]
            sets.current = sets.refreshes % len(sets.softs)
            sets.refreshes += 1
            self.last_key = key
            self._inner(sets.soft, batch, abl[torch.tensor([k == key for k in keys], device=dev)], z0, gen)

    def _inner(self, soft: SoftTokens, batch: dict, abl: torch.Tensor, z0: torch.Tensor, gen: torch.Generator) -> None:
        ab, cfg, dev = self.ablation, self.cfg, self.ablation.device
        # Every inner step's rows, timesteps and noise, drawn from `gen` in the order the steps would
        # draw them one by one, so the draws are those of a step-by-step loop. The frozen model's goal
        # does not depend on the tokens, so the goals of all the steps come from batched forwards
        # (TEACHER_ROWS rows each): on the toy UNet one forward of 64 rows takes 0.7x the time of 8 of
        # 8 rows on one thread (0.4-0.5x on two), and the goals were a third of a robust step's time.
        draws = []
        for _ in range(cfg.robust_inner_steps):
            pick = abl[torch.randint(0, len(abl), (cfg.robust_batch_size,), generator=gen, device=dev)]
            t = torch.randint(cfg.robust_t_min, ab.num_train_timesteps, (len(pick),), generator=gen, device=dev)
            noise = torch.randn(z0[pick].shape, generator=gen, device=dev, dtype=z0.dtype)
            draws.append((pick, t, ab.scheduler.add_noise(z0[pick], noise, t)))
        goals = self._teacher(torch.cat([z for _, _, z in draws]), torch.cat([t for _, t, _ in draws]),
                              [batch["target"][i] for pick, _, _ in draws for i in pick.tolist()])
        opt = torch.optim.Adam(soft.parameters(), lr=cfg.robust_lr)
        for (pick, t, z_t), goal in zip(draws, goals.split(cfg.robust_batch_size)):
            loss = denoising_loss(self.snapshot_unet, z_t, t, self._cond(soft, self.captions(soft, batch, pick), grad=True),
                                  goal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.last_loss = float(loss.detach())

    @torch.no_grad()
    def _teacher(self, z_t, t, captions):
        """The frozen model's prediction for `captions` at (z_t, t), TEACHER_ROWS rows a forward."""
        ab = self.ablation
        out = []
        for i in range(0, len(captions), TEACHER_ROWS):
            h, add = ab.prompts.encode(self.encoders, ab.prompts.tokenize(captions[i:i + TEACHER_ROWS], ab.device))
            out.append(ab.teacher(z_t[i:i + TEACHER_ROWS], t[i:i + TEACHER_ROWS], encoder_hidden_states=h,
                                  added_cond_kwargs=add).float())
        return torch.cat(out)

    def conditioning(self, batch: dict, idx):
        """The UNet conditioning of c*(v*) for rows `idx` (no gradient reaches v): each row with the
        set its concept's last refresh trained."""
        keys = self.row_keys(batch, idx)
        groups = dict.fromkeys(keys)
        if len(groups) == 1:
            soft = self.sets[keys[0]].soft
            return self._cond(soft, self.captions(soft, batch, idx), grad=False)
        parts, order = [], []
        for key in groups:
            pos = [j for j, k in enumerate(keys) if k == key]
            rows = idx[torch.tensor(pos, device=idx.device)]
            soft = self.sets[key].soft
            parts.append(self._cond(soft, self.captions(soft, batch, rows), grad=False))
            order += pos
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(len(order))
        h = torch.cat([p[0] for p in parts])[inv.to(parts[0][0].device)]
        add = None
        if parts[0][1] is not None:
            add = {name: torch.cat([p[1][name] for p in parts])[inv.to(parts[0][1][name].device)]
                   for name in parts[0][1]}
        return h, add

    # --- checkpoint state ---
    def state(self) -> dict[str, torch.Tensor]:
        if not self.per_concept:
            sets = self.sets[None]
            out = {"current": torch.tensor(sets.current)}
            for k, soft in enumerate(sets.softs):
                out.update({f"{k}.{name}": v for name, v in soft.state().items()})
            return out
        out = {"concepts": torch.tensor(len(self.sets))}
        for j, (key, sets) in enumerate(self.sets.items()):
            out[f"c{j}.words"] = torch.tensor(list(key.encode()), dtype=torch.uint8)
            out[f"c{j}.anchor"] = torch.tensor(list(sets.anchor.encode()), dtype=torch.uint8)
            out[f"c{j}.current"] = torch.tensor(sets.current)
            out[f"c{j}.refreshes"] = torch.tensor(sets.refreshes)
            for k, soft in enumerate(sets.softs):
                out.update({f"c{j}.{k}.{name}": v for name, v in soft.state().items()})
        return out

    def _load_sets(self, sets: _Sets, state: dict[str, torch.Tensor], prefix: str) -> None:
        names = {name[len(prefix):].split(".", 1)[0] for name in state if name.startswith(prefix)}
        found = {n for n in names if n.isdigit()}
        if found != {str(k) for k in range(len(sets.softs))}:
            raise ValueError(f"the checkpoint's inner attacker has {len(found)} sets of soft tokens, this run's "
                             f"robust_inits {self.cfg.robust_inits} need {len(sets.softs)}")
        for k, soft in enumerate(sets.softs):
            soft.load_state({name[len(f"{prefix}{k}."):]: v for name, v in state.items()
                             if name.startswith(f"{prefix}{k}.")})

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if ("concepts" in state) != self.per_concept:
            raise ValueError("the checkpoint's inner attacker was " + ("per concept" if "concepts" in state else "shared")
                             + f", this run's robust_per_concept is {self.per_concept}")
        if not self.per_concept:
            self._load_sets(self.sets[None], state, "")
            self.sets[None].current = int(state["current"])
            return
        self.sets.clear()
        for j in range(int(state["concepts"])):
            word = lambda name: bytes(state[f"c{j}.{name}"].tolist()).decode()  # noqa: E731
            sets = self._sets_for(word("words"), word("anchor"))
            self._load_sets(sets, state, f"c{j}.")
            sets.current, sets.refreshes = int(state[f"c{j}.current"]), int(state[f"c{j}.refreshes"])
