"""The closed-form edit (`method: closed-form`): ablation by least squares, with no training.

A cross-attention key/value projection `W` (out x d) of the UNet reads only the text encoder's
token vectors. The edit asks every token of a target caption c* to produce the key/value the base
weight `W0` gives the aligned token of its anchor caption c, while the tokens of preservation
captions (neighbours first, the anchor captions themselves, other prompts) keep theirs:

    W* = argmin_W  ||W X* - W0 Y||^2 / n  +  lam ||W X_0 - W0 X_0||^2 / n_0  +  rho ||W - W0||^2

with X* (d x n) the target captions' token vectors, Y the aligned anchor-caption token vectors and
X_0 the preservation captions'. This is the UCE-style edit; its normal equations are the ones the
multi-concept merge solves (`merge.solve_normal_equations`):

    W* (X* X*^T / n + lam G_0 + rho I) = W0 (Y X*^T / n) + lam W0 G_0 + rho W0.

Token alignment: the two captions' token ids are aligned by `difflib` (equal runs map position to
position, padding included; a replaced run, the concept's words, maps every target token to the
anchor run's last token, which in a causal text encoder carries the whole anchor phrase).

It writes the usual delta (group `xattn-kv`) and runs in well under a second on the toy model. It
removes the *word*; it is not robust to an attacker who optimises new tokens (see `rayablate.attack`).
"""
from __future__ import annotations

import difflib
import time

import torch

from .merge import gram, is_xattn_kv_weight, solve_normal_equations

GROUP = "xattn-kv"


def align(target_ids: list[int], anchor_ids: list[int]) -> list[tuple[int, int]]:
    """(target position, anchor position) pairs of two token-id sequences (see the module docstring)."""
    pairs = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=target_ids, b=anchor_ids, autojunk=False).get_opcodes():
        if op == "equal":
            pairs += [(i1 + k, j1 + k) for k in range(i2 - i1)]
        elif op in ("replace", "delete"):
            j = j2 - 1 if j2 > j1 else max(j1 - 1, 0)  # the anchor run's last token (or the one before a deletion)
            pairs += [(i, j) for i in range(i1, i2)]
    return pairs


@torch.no_grad()
def _token_vectors(pipe, captions: list[str], batch: int = 64) -> tuple[torch.Tensor, list[list[int]]]:
    """Conditioning vectors (n x L x d, float64) and the first tokenizer's ids of `captions`."""
    from .conditioning import PromptEncoder
    from .pipeline import text_encoders

    enc = PromptEncoder(pipe)
    encoders = [m for _, m in text_encoders(pipe)]
    hs, ids_out = [], []
    for i in range(0, len(captions), batch):
        ids = enc.tokenize(captions[i:i + batch], "cpu")
        h, _ = enc.encode(encoders, [x.to(next(encoders[0].parameters()).device) for x in ids])
        hs.append(h.detach().to("cpu", torch.float64))
        ids_out += ids[0].tolist()
    return torch.cat(hs), ids_out


def edit_data(pipe, pairs: list[tuple[str, str]], keep: list[str]) -> dict[str, torch.Tensor]:
    """The edit's data terms: A = X* X*^T / n, C = Y X*^T / n (d x d) and G_0 (d x d)."""
    if not pairs:
        raise ValueError("the closed-form edit needs at least one (target, anchor) caption pair")
    h_t, ids_t = _token_vectors(pipe, [t for t, _ in pairs])
    h_a, ids_a = _token_vectors(pipe, [a for _, a in pairs])
    xs, ys = [], []
    for k in range(len(pairs)):
        idx = align(ids_t[k], ids_a[k])
        xs.append(h_t[k, [i for i, _ in idx]])
        ys.append(h_a[k, [j for _, j in idx]])
    x, y = torch.cat(xs), torch.cat(ys)
    out = {"A": x.T @ x / len(x), "C": y.T @ x / len(x)}
    if keep:
        h0, _ = _token_vectors(pipe, keep)
        out["G0"] = gram(h0)
    return out


def closed_form_tensors(pipe, data: dict[str, torch.Tensor], lam: float, ridge: float) -> dict[str, torch.Tensor]:
    """The edited value of every cross-attention key/value weight of `pipe`'s UNet."""
    out = {}
    for name, p in pipe.unet.named_parameters():
        full = f"unet.{name}"
        if not is_xattn_kv_weight(full):
            continue
        w0 = p.detach().to("cpu", torch.float64)
        w = solve_normal_equations(w0, data["A"], w0 @ data["C"], data.get("G0"), lam, ridge)
        out[full] = w.to(torch.float32)
    if not out:
        raise ValueError("this UNet has no cross-attention key/value projections (attn2.to_k / attn2.to_v)")
    return out


def closed_form_edit(pipe, cfg, world) -> tuple[dict[str, torch.Tensor], dict]:
    """The closed-form edit of `cfg.concept` on `pipe` (not changed). Returns (delta tensors, info):
    the captions come from the world exactly as the trained methods' rows do (`data.prompt_rows`)."""
    spec = cfg.concept
    t0 = time.time()
    pairs = world.caption_pairs(spec, cfg.num_anchor_images, cfg.seed)
    keep = list(world.preservation_captions(spec, cfg.num_preservation_images, cfg.seed + 1))
    keep += sorted({a for _, a in pairs})  # the anchor's own captions keep their keys and values
    tensors = closed_form_tensors(pipe, edit_data(pipe, pairs, keep), cfg.closed_form_lambda, cfg.closed_form_ridge)
    info = {"method": "closed-form", "pairs": len(pairs), "preservation_captions": len(keep),
            "tensors": len(tensors), "lambda": cfg.closed_form_lambda, "ridge": cfg.closed_form_ridge,
            "edit_seconds": round(time.time() - t0, 3)}
    return tensors, info
