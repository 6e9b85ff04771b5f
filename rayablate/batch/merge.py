"""One model for the whole batch: the least-squares merge of the concepts' deltas, and the captions it fits.

The math (Gram matrices, the ridge solve, the naive sum) is `rayablate.merge`; this module picks which
captions each concept's edit must hold on and keeps `<out>/merged/` resumable.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..files import write_json
from .spec import Batch


def names_any(caption: str, word_lists: list[list[str]]) -> bool:
    """Whether `caption` names any word of `word_lists` as a whole word, any case."""
    from ..prompts import names_word

    return any(names_word(caption, w) for words in word_lists for w in words)


def training_captions(data_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(ablation captions c*, their anchor captions c, preservation captions) of written shards."""
    import pyarrow.parquet as pq

    t = pq.read_table(str(data_dir), columns=["target_caption", "anchor_caption", "mask"]).to_pydict()
    abl = [c for c, m in zip(t["target_caption"], t["mask"]) if m]
    anc = [a for a, m in zip(t["anchor_caption"], t["mask"]) if m]
    pres = [c for c, m in zip(t["target_caption"], t["mask"]) if not m]
    return abl, anc, pres


MERGE_CAPTION_RULE = "own-concept-only"  # concept captions naming another batch concept are left out
ROBUST_RULE = "robust-added"  # robust concepts' deltas are added on top, not fitted (rayablate/merge.py)
# A concept whose edit the merge reproduces this badly on its own captions is likely still drawn by
# the merged model (world v2, 16 concepts: residuals 0.36-0.58 for characters it still drew in
# 16-88 % of images; 0.10-0.18 for styles it removed)
RESIDUAL_WARN = 0.25


def merge_captions(batch: Batch, out: Path, world, names: list[str]) -> tuple[list[list[str]], list[str]]:
    """(each concept's ablation captions, the shared preservation captions) the merge fits."""
    words = {c.name: world.concept_words(c.cfg.concept) for c in batch.concepts}
    all_words = list(words.values())
    concept_caps, preserve = [], []
    for n in names:
        abl, anc, pres = training_captions(out / "concepts" / n / "data")
        # A caption that also names another concept of the batch ("a dotted kubo") has no right answer in
        # any single delta: the dotted delta draws a plain kubo, the kubo delta a dotted square. Fitting it
        # to either fights the other concept's fit (on the toy batch: residuals 25-44 %, dotted left at 41 %
        # in the merged model). Such captions are left to the prior (the naive sum composes both edits).
        others = [w for m, w in words.items() if m != n]
        concept_caps.append(sorted({c for c in abl if not names_any(c, others)}))
        preserve += anc + [p for p in pres if not names_any(p, all_words)]
    return concept_caps, sorted(set(preserve))


def merge_batch(batch: Batch, out: Path, models, names: list[str], progress=print) -> dict:
    """Least-squares merge (and naive sum) of the succeeded concepts' deltas into <out>/merged/."""
    from ..merge import merge_delta_files

    s = batch.settings
    mdir = out / "merged"
    info_path = mdir / "merge.json"
    settings = {"lambda": s.merge_lambda, "ridge": s.merge_ridge, "prior": s.merge_prior,
                "captions": MERGE_CAPTION_RULE, "robust": ROBUST_RULE}
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("concepts") == names and all(info.get(k) == v for k, v in settings.items()) \
                and (mdir / "merged_delta.safetensors").exists():
            progress("[batch] merge: already done, skipped")
            return dict(info, skipped=True)
    mdir.mkdir(parents=True, exist_ok=True)
    concept_caps, preserve = merge_captions(batch, out, models.world, names)
    t = time.time()
    deltas = [str(out / "concepts" / n / "matcher_delta.safetensors") for n in names]
    robust = {c.name: c.cfg.robust for c in batch.concepts}
    report = merge_delta_files(models.model_path, deltas, concept_caps, preserve, mdir / "merged_delta.safetensors",
                               mdir / "sum_delta.safetensors", lam=s.merge_lambda, ridge=s.merge_ridge,
                               prior=s.merge_prior, added=[robust[n] for n in names])
    report["relative_residual"] = {names[int(k)]: v for k, v in report["relative_residual"].items()}
    report["added"] = [names[i] for i in report["added"]]
    info = {"concepts": names, "seconds": time.time() - t, **report, "captions": MERGE_CAPTION_RULE,
            "robust": ROBUST_RULE,
            "note": "least squares on cross-attention k/v weights; any other tensor is the naive sum"}
    write_json(info_path, info)
    fitted = [n for n in names if n not in report["added"]]
    added = f"; robust, added as trained: {', '.join(report['added'])}" if report["added"] else ""
    if fitted:
        progress(f"[batch] merge: {len(report['least_squares'])} k/v weights by least squares over "
                 f"{sum(report['num_concept_captions'])} concept + {len(preserve)} preservation captions "
                 f"(fitted: {', '.join(fitted)}{added}), {len(report['summed'])} summed; in {info['seconds']:.1f}s")
    else:
        progress(f"[batch] merge: every concept is robust, so the merged model is the naive sum "
                 f"({len(report['summed'])} tensors); in {info['seconds']:.1f}s")
    poor = {n: r for n, r in report["relative_residual"].items() if r is not None and r > RESIDUAL_WARN}
    if poor:
        # the merge could not hold these edits on their own captions: the merged model may keep them
        progress(f"[batch] merge: warning: {len(poor)} concept(s) fit poorly (relative residual > {RESIDUAL_WARN}: "
                 + ", ".join(f"{n} {r:.2f}" for n, r in sorted(poor.items(), key=lambda x: -x[1]))
                 + "); too many edits for the k/v weights' input dimension? compare the merged, sum and joint rows")
    return dict(info, skipped=False)
