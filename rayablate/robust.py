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

The attacker's state (its vectors) is part of every checkpoint, one file per rank, so resume is exact.
"""
from __future__ import annotations

import copy
import difflib

import torch

from .soft_tokens import SoftTokens, denoising_loss

STATE_FILE = "robust_rank{}.pt"


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


class InnerAttacker:
    """The inner loop of robust ablation on one worker (see the module docstring)."""

    def __init__(self, ablation, tokenizers):
        cfg = ablation.cfg
        self.ablation, self.cfg = ablation, cfg
        teacher = ablation.teacher
        # The snapshot: the teacher's architecture, refreshed with the matcher's current values.
        self.snapshot_unet = copy.deepcopy(teacher.unet).requires_grad_(False)
        self.encoders = list(teacher.text_encoders.values())  # frozen: robust mode trains UNet groups only
        words = {"anchor": [cfg.concept.anchor], "target": [cfg.concept.target], "random": []}
        # one set of soft tokens per start: an evaluation attack may start from any of them
        self.softs = [SoftTokens(tokenizers, self.encoders, cfg.robust_vectors, words[init],
                                 seed=cfg.seed + 7919 * (ablation.rank + 1) + 104729 * k, device=ablation.device)
                      for k, init in enumerate(cfg.robust_inits)]
        self.current = 0  # the set refreshed last: the one the outer loss defends against
        self._snap_params = dict(self.snapshot_unet.named_parameters())
        self.last_loss = float("nan")

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

    @property
    def soft(self) -> SoftTokens:
        return self.softs[self.current]

    def _cond(self, captions, grad: bool):
        ids = self.soft.tokenize(captions, self.ablation.device)
        with torch.set_grad_enabled(grad), self.soft.installed(self.encoders):
            return self.ablation.prompts.encode(self.encoders, ids)

    def captions(self, batch: dict, idx) -> list[str]:
        text = self.soft.text
        return [adversarial_caption(batch["target"][i], batch["anchor"][i], text) for i in idx.tolist()]

    # --- the inner loop ---
    def refresh(self, batch: dict, step: int, full_param=None) -> None:
        """Snapshot the matcher, then `robust_inner_steps` Adam steps against it on this step's
        ablation rows, seeded by (seed, rank, step), on the sets of soft tokens in turn."""
        from .method import step_seed

        ab, cfg = self.ablation, self.cfg
        self.current = ((step - 1) // cfg.robust_every) % len(self.softs)
        self.refresh_snapshot(full_param)  # on every rank, rows or not: it can be a collective
        abl = (batch["mask"] > 0.5).nonzero().squeeze(1)
        if abl.numel() == 0:
            return
        dev = ab.device
        gen = torch.Generator(device=dev).manual_seed(step_seed(cfg.seed + 3, ab.rank, step))
        z0 = ab.encode_images(batch["images"], gen)
        opt = torch.optim.Adam(self.soft.parameters(), lr=cfg.robust_lr)
        for _ in range(cfg.robust_inner_steps):
            pick = abl[torch.randint(0, len(abl), (cfg.robust_batch_size,), generator=gen, device=dev)]
            t = torch.randint(cfg.robust_t_min, ab.num_train_timesteps, (len(pick),), generator=gen, device=dev)
            noise = torch.randn(z0[pick].shape, generator=gen, device=dev, dtype=z0.dtype)
            z_t = ab.scheduler.add_noise(z0[pick], noise, t)
            goal = self._teacher(z_t, t, [batch["target"][i] for i in pick.tolist()])
            loss = denoising_loss(self.snapshot_unet, z_t, t, self._cond(self.captions(batch, pick), grad=True), goal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.last_loss = float(loss.detach())

    @torch.no_grad()
    def _teacher(self, z_t, t, captions):
        ab = self.ablation
        h, add = ab.prompts.encode(self.encoders, ab.prompts.tokenize(captions, ab.device))
        return ab.teacher(z_t, t, encoder_hidden_states=h, added_cond_kwargs=add).float()

    def conditioning(self, batch: dict, idx):
        """The UNet conditioning of c*(v*) for rows `idx` (no gradient reaches v)."""
        return self._cond(self.captions(batch, idx), grad=False)

    # --- checkpoint state ---
    def state(self) -> dict[str, torch.Tensor]:
        out = {"current": torch.tensor(self.current)}
        for k, soft in enumerate(self.softs):
            out.update({f"{k}.{name}": v for name, v in soft.state().items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        sets = {name.split(".", 1)[0] for name in state if name != "current"}
        if sets != {str(k) for k in range(len(self.softs))}:
            raise ValueError(f"the checkpoint's inner attacker has {len(sets)} sets of soft tokens, this run's "
                             f"robust_inits {self.cfg.robust_inits} need {len(self.softs)}")
        self.current = int(state["current"])
        for k, soft in enumerate(self.softs):
            soft.load_state({name.split(".", 1)[1]: v for name, v in state.items() if name.startswith(f"{k}.")})
