"""Merging per-concept matcher deltas into one model.

Cross-attention key/value projections read only the text encoder's hidden states, so a weight
`W` (out x d) of `attn2.to_k`/`attn2.to_v` acts on caption-token embeddings `c` (d). Concept `i`'s
separately trained weight `W_i` says what its captions should map to; the base weight `W0` says
what every caption that must not change maps to. The closed-form least-squares merge (the normal
equations UCE and MACE solve) is

    W* = argmin_W  sum_i ||W C_i - W_i C_i||^2 / n_i  +  lam ||W C_0 - W0 C_0||^2 / n_0
                   + rho ||W - P||^2

with `C_i` (d x n_i) concept i's ablation-caption token embeddings, `C_0` the preservation
captions' (anchors, neighbours, everything else the separate runs kept), and a small ridge `rho`
towards a prior `P`. Setting the gradient to zero gives

    W* (sum_i G_i + lam G_0 + rho I) = sum_i W_i G_i + lam W0 G_0 + rho P,   G = C C^T / n.

Every k/v layer reads the same embeddings, so the Gram matrices are computed once per batch.

The prior `P` is the naive sum `W0 + sum_i (W_i - W0)` by default (`prior="sum"`): in directions
no caption constrains, each concept's edit is kept as it was trained (its generalisation to
unseen phrasings included) instead of being pulled back to `W0` (`prior="base"`, UCE's choice).

Tensors that are not cross-attention k/v weights (biases, other parameter groups, text
embeddings) have no such closed form here: they fall back to the naive sum, and the report says
which tensors did.

**Added, not fitted: robust deltas.** A robust delta (`robust: true`) holds against an attacker's
new token embeddings because of how its edit acts *off* the captions it was trained on. The fit
above pins each edit only on caption embeddings, so it reshapes exactly those directions: on the
toy batch (striped + zorb, both robust) the target-started inversion brought the least-squares
merge back to 81 % / 100 % (the separate deltas and the naive sum: 6 % / 3 %); adding the inner
attacker's final tokens as more fitting rows still left striped at 62 %. So deltas marked
`added` are not fitted: the merge fits the other deltas, then adds each added delta's change
`W_a - W0` on top, so a robust edit reaches the merged model exactly as it was trained.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

KV_WEIGHT = re.compile(r"\.attn2\.to_[kv]\.weight$")


def is_xattn_kv_weight(name: str) -> bool:
    return bool(KV_WEIGHT.search(name))


def gram(embeddings: torch.Tensor) -> torch.Tensor:
    """G = C C^T / n for token embeddings given as rows (n x d), in float64."""
    x = embeddings.reshape(-1, embeddings.shape[-1]).to(torch.float64)
    if len(x) == 0:
        raise ValueError("no embeddings to build a Gram matrix from")
    return x.T @ x / len(x)


def least_squares_merge(w0: torch.Tensor, weights: list[torch.Tensor], grams: list[torch.Tensor],
                        gram0: torch.Tensor | None, lam: float = 1.0, ridge: float = 1e-3,
                        prior: torch.Tensor | None = None) -> torch.Tensor:
    """Solve the normal equations above for one weight (out x d).

    `weights[i]` is concept i's full trained weight W_i (W0 where it did not change the tensor),
    `grams[i]` its Gram matrix; `ridge` is relative to the mean eigenvalue of the data term, so it
    does not depend on the embeddings' scale. `prior` defaults to W0.
    """
    if len(weights) != len(grams):
        raise ValueError(f"{len(weights)} weights but {len(grams)} Gram matrices")
    w0d = w0.to(torch.float64)
    d = w0d.shape[1]
    a = torch.zeros(d, d, dtype=torch.float64)
    b = torch.zeros_like(w0d)
    for w, g in zip(weights, grams):
        a += g
        b += w.to(torch.float64) @ g
    return solve_normal_equations(w0, a, b, gram0, lam, ridge, prior)


def solve_normal_equations(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gram0: torch.Tensor | None,
                           lam: float = 1.0, ridge: float = 1e-3, prior: torch.Tensor | None = None) -> torch.Tensor:
    """W with W (A + lam G_0 + rho I) = B + lam W0 G_0 + rho P: the data terms A (d x d) and
    B (out x d) come from the caller (the merge above; the closed-form edit of `rayablate.closed_form`).
    `ridge` is relative to the mean eigenvalue of A + lam G_0; `prior` defaults to W0."""
    w0d = w0.to(torch.float64)
    d = w0d.shape[1]
    a, b = a.to(torch.float64).clone(), b.to(torch.float64).clone()
    if gram0 is not None and lam > 0:
        a += lam * gram0
        b += lam * (w0d @ gram0)
    rho = ridge * float(torch.trace(a)) / d if ridge > 0 else 0.0
    if rho > 0:
        a += rho * torch.eye(d, dtype=torch.float64)
        b += rho * (w0d if prior is None else prior.to(torch.float64))
    # W A = B with A symmetric  <=>  A W^T = B^T
    sol = torch.linalg.solve(a, b.T).T
    return sol.to(w0.dtype)


def naive_sum(base: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """W0 + sum_i (W_i - W0) for every tensor any delta changes (deltas hold full values)."""
    out = {}
    for name in sorted({n for d in deltas for n in d}):
        w0 = base[name].to(torch.float64)
        out[name] = (w0 + sum(d[name].to(torch.float64) - w0 for d in deltas if name in d)).to(base[name].dtype)
    return out


def merge_tensors(base: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]], grams: list[torch.Tensor],
                  gram0: torch.Tensor | None, lam: float = 1.0, ridge: float = 1e-3,
                  prior: str = "sum", added: list[bool] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge full-valued deltas: least squares for xattn k/v weights, the naive sum for the rest.

    `added[i]`: delta i is not fitted but added on top (robust deltas, see the module docstring);
    `grams[i]` is then unused. Returns (merged tensors, report {"least_squares": [...], "summed": [...]}).
    """
    if prior not in ("sum", "base"):
        raise ValueError(f"prior must be 'sum' or 'base', got {prior!r}")
    added = list(added) if added is not None else [False] * len(deltas)
    if len(added) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(added)} added flags")
    fit = [i for i, a in enumerate(added) if not a]
    summed = naive_sum(base, deltas)
    # the prior of the fit: the naive sum of the fitted deltas only (the added ones go on top)
    fit_sum = summed if len(fit) == len(deltas) else naive_sum(base, [deltas[i] for i in fit])
    merged, ls_names, sum_names = {}, [], []
    for name, s in summed.items():
        if is_xattn_kv_weight(name) and fit:
            w0 = base[name]
            ws = [deltas[i].get(name, w0) for i in fit]
            w = least_squares_merge(w0, ws, [grams[i] for i in fit], gram0, lam, ridge,
                                    prior=fit_sum.get(name, w0) if prior == "sum" else None).to(torch.float64)
            for i, a in enumerate(added):
                if a and name in deltas[i]:
                    w = w + deltas[i][name].to(torch.float64) - w0.to(torch.float64)
            merged[name] = w.to(w0.dtype)
            ls_names.append(name)
        else:
            merged[name] = s
            sum_names.append(name)
    return merged, {"least_squares": ls_names, "summed": sum_names, "lambda": lam, "ridge": ridge, "prior": prior,
                    "added": [i for i, a in enumerate(added) if a]}


# --- on a pipeline ----------------------------------------------------------------------------

@torch.no_grad()
def caption_embeddings(pipe, captions: Iterable[str], batch: int = 64) -> torch.Tensor:
    """Every token's conditioning vector (what attn2.to_k/to_v read) for `captions`: (n_tokens x d).

    All positions are kept, padding included: the UNet attends to every one of them.
    """
    from .pipeline import text_encoders
    from .conditioning import PromptEncoder

    captions = [str(c) for c in captions]
    enc = PromptEncoder(pipe)
    encoders = [m for _, m in text_encoders(pipe)]
    out = []
    for i in range(0, len(captions), batch):
        ids = enc.tokenize(captions[i:i + batch], "cpu")
        h, _ = enc.encode(encoders, ids)
        out.append(h.reshape(-1, h.shape[-1]).to(torch.float64))
    if not out:
        raise ValueError("no captions to embed")
    return torch.cat(out)


def base_tensors(pipe, names: Iterable[str]) -> dict[str, torch.Tensor]:
    from .pipeline import components

    params = {f"{c}.{n}": p for c, m in components(pipe) for n, p in m.named_parameters()}
    missing = [n for n in names if n not in params]
    if missing:
        from .pipeline import DeltaError

        raise DeltaError(f"delta tensors not in this pipeline: {missing[:3]}")
    return {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}


def merge_delta_files(model_path: str, delta_paths: list[str], concept_captions: list[list[str]],
                      preserve_captions: list[str], out_ls: str | Path, out_sum: str | Path | None = None,
                      lam: float = 1.0, ridge: float = 1e-3, prior: str = "sum",
                      added: list[bool] | None = None) -> dict:
    """Merge delta files of one base model; write the least-squares merge (and the naive sum).
    `added[i]`: delta i is added on top, not fitted (robust deltas)."""
    from .pipeline import load_pipeline, read_delta, write_delta_file

    if len(delta_paths) != len(concept_captions):
        raise ValueError("one caption list per delta is needed")
    pipe = load_pipeline(model_path)
    deltas, groups = [], set()
    for p in delta_paths:
        t, meta = read_delta(p)
        deltas.append(t)
        groups.add(meta.get("group", ""))
    names = sorted({n for d in deltas for n in d})
    base = base_tensors(pipe, names)
    grams = [gram(caption_embeddings(pipe, caps)) for caps in concept_captions]
    gram0 = gram(caption_embeddings(pipe, preserve_captions)) if preserve_captions else None
    merged, report = merge_tensors(base, deltas, grams, gram0, lam, ridge, prior, added)
    group = groups.pop() if len(groups) == 1 else "mixed"
    write_delta_file(pipe, merged, out_ls, group, {"merge": "least-squares", "concepts": str(len(deltas))})
    if out_sum is not None:
        write_delta_file(pipe, naive_sum(base, deltas), out_sum, group, {"merge": "sum", "concepts": str(len(deltas))})
    # how well each concept's own edit survives the merge, on its own captions (relative residual)
    report["relative_residual"] = {}
    for i, caps_g in enumerate(grams):
        num = den = 0.0
        for name in report["least_squares"]:
            wi = deltas[i].get(name, base[name]).to(torch.float64)
            diff = merged[name].to(torch.float64) - wi
            num += float(torch.trace(diff @ caps_g @ diff.T))
            dd = wi - base[name].to(torch.float64)
            den += float(torch.trace(dd @ caps_g @ dd.T))
        report["relative_residual"][str(i)] = (num / den) if den > 0 else None
    report["num_preserve_captions"] = len(preserve_captions)
    report["num_concept_captions"] = [len(c) for c in concept_captions]
    return report
