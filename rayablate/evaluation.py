"""Evaluation: before/after generations (Ray Data batch inference), metrics, report, grid, loss curve.

metrics.json holds one object per prompt group (`target`, `anchor`, `neighbours.<name>`,
`paraphrases`), each with concept_rate_before/after (by the world's judge, where it has one: the
toy world's attribute probe), clip_accuracy_before/after (target name vs anchor name, as in the
paper), clip_score_before/after, and `kid` (before vs after, on CLIP image features) for anchor
and neighbour groups. See docs/design.md.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import metrics as M
from . import report as R
from . import sampling as S
from .config import AblationConfig, to_dict
from .files import write_json, write_text
from .images import save_grid
from .prompts import EvalGroup


# Evaluation images are drawn in batches of at most this many rows (balanced across the actors).
EVAL_BATCH = 32


def eval_rows(groups: list[EvalGroup], seed: int) -> list[dict]:
    """One row per evaluation prompt, in group order: {"group", "prompt", "seed", "idx"}."""
    return [{"group": g.name, "prompt": p, "seed": S.prompt_seed(seed, i), "idx": i}
            for g in groups for i, p in enumerate(g.prompts)]


def _rows_key(rows: list[dict], cfg: AblationConfig) -> str:
    """What names the evaluation's images: its rows' prompts and seeds and its sampler settings."""
    import hashlib
    import json

    text = json.dumps([[r["prompt"], int(r["seed"])] for r in rows]
                      + [int(cfg.eval_steps), float(cfg.guidance_scale),
                         S.resolve_sample_precision(cfg.sample_precision, cfg.use_gpu)])
    return hashlib.sha256(text.encode()).hexdigest()


def after_image_plan(cfg: AblationConfig, world, num_actors: int, model_path: str | None = None) -> dict:
    """What the training workers draw after training so the evaluation need not (`train.draw_after_images`):
    the evaluation's prompts and seeds in its row order, its sampler settings and batch size, and a
    key the evaluation checks the images against. With `model_path`, also "before": the rows whose
    before-image the base-image cache lacks (every row when the cache is off), which the workers
    draw with the base model, so that a first job's evaluation starts no sampler either."""
    rows = eval_rows(world.eval_groups(cfg.concept, cfg.eval_images, cfg.eval_seed), cfg.eval_seed)
    plan = {"prompts": [r["prompt"] for r in rows], "seeds": [r["seed"] for r in rows], "steps": cfg.eval_steps,
            "guidance": cfg.guidance_scale, "batch_size": S.balanced_batch_size(len(rows), num_actors, EVAL_BATCH),
            "precision": S.resolve_sample_precision(cfg.sample_precision, cfg.use_gpu), "key": _rows_key(rows, cfg)}
    if model_path is not None:
        from .image_cache import BaseImageCache

        cache = BaseImageCache.for_model(model_path, cfg.use_gpu, cfg.sample_precision)
        held = cache.pngs(rows, "prompt", cfg.eval_steps, cfg.guidance_scale) if cache else [None] * len(rows)
        plan["before"] = [i for i, png in enumerate(held) if png is None]
    return plan


def _workers_before_images(rows: list[dict], after_images: dict, model_path: str, cfg: AblationConfig) -> dict:
    """The before-images the training workers drew (`after_images["before"]`: {row index: PNG}): kept
    in the base-image cache, where the evaluation then finds them; {"before": one PNG per row} for
    `draw_images`' `given` when there is no cache and the workers drew every row; else {}."""
    from .image_cache import BaseImageCache

    before = {int(i): png for i, png in (after_images.get("before") or {}).items()}
    if not before:
        return {}
    cache = BaseImageCache.for_model(model_path, cfg.use_gpu, cfg.sample_precision)
    if cache is not None:
        idx = sorted(before)
        cache.store([rows[i] for i in idx], [before[i] for i in idx], "prompt", cfg.eval_steps, cfg.guidance_scale)
        return {}
    return {"before": [before[i] for i in range(len(rows))]} if len(before) == len(rows) else {}


def generate_before_after(groups: list[EvalGroup], model_path: str, delta_path: str | None, cfg: AblationConfig,
                          seed: int, num_actors: int = 1,
                          after_images: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{group name: {"before": uint8 NxHxWx3, "after": ...}} through a Ray Data actor pool; the
    before-images the base-image cache holds are not drawn again (rayablate/image_cache.py), nor
    the after-images the training workers drew with `delta_path` (`after_images`: {"pngs", "key"}
    of `train.draw_after_images`; used only when its key is these rows' and settings')."""
    from .console import say

    rows = eval_rows(groups, seed)
    deltas = {"before": None, **({"after": delta_path} if delta_path else {})}
    given, by_workers = None, 0
    if after_images and delta_path and after_images.get("key") == _rows_key(rows, cfg):
        given = {"after": after_images["pngs"], **_workers_before_images(rows, after_images, model_path, cfg)}
        by_workers = len(after_images.get("before") or {})
        say(f"[evaluate] the training workers drew the {len(rows)} after-images"
            + (f" and {by_workers} before-images" if by_workers else ""))
    images, hits = S.draw_images(rows, model_path, deltas, lambda r: r["group"], steps=cfg.eval_steps,
                                 guidance=cfg.guidance_scale, use_gpu=cfg.use_gpu, num_actors=num_actors,
                                 batch_size=EVAL_BATCH, given=given, precision=cfg.sample_precision)
    if hits.get("before", 0) > by_workers:
        say(f"[evaluate] {hits['before'] - by_workers} of the {len(rows)} before-images came from the base-image cache")
    return {g.name: images.get(g.name, {}) for g in groups}


def sample_groups(pipe, groups: list[EvalGroup], seed: int, steps: int, guidance: float,
                  device: str = "cpu", precision: str = "fp32") -> dict[str, np.ndarray]:
    """{group name: uint8 NxHxWx3} of `pipe` in this process, with the evaluation's seeds, drawn in
    `precision` (sampling.SAMPLE_PRECISIONS)."""
    return {g.name: S.sample_images(pipe, g.prompts, [S.prompt_seed(seed, i) for i in range(len(g.prompts))],
                                    steps, guidance, device, precision) for g in groups}


def quick_evaluate(cfg: AblationConfig, model_path: str, delta_path: str, clip_name: str, world,
                   groups: list[EvalGroup], before: dict[str, np.ndarray], seed: int) -> dict[str, dict]:
    """After-images of each group in this process (a Tune trial's own CPU), measured against
    shared before-images: the same metric names as `evaluate`."""
    from .clip import ClipScorer
    from .pipeline import apply_delta, load_pipeline

    device = "cuda" if cfg.use_gpu else "cpu"
    pipe = load_pipeline(model_path, device=device)
    apply_delta(pipe, delta_path)
    after = sample_groups(pipe, groups, seed, cfg.eval_steps, cfg.guidance_scale, device, cfg.sample_precision)
    images = {g.name: {"before": before[g.name], "after": after[g.name]} for g in groups}
    return M.measure_groups(groups, images, cfg.concept, ClipScorer.load(clip_name), world.judge(), world)


def evaluate(cfg: AblationConfig, model_path: str, delta_path: str | None, clip_name: str, out_dir: str | Path,
             world, train_history: list[dict] | None = None, num_actors: int = 1, seed: int | None = None,
             extra: dict | None = None, after_images: dict | None = None) -> dict:
    """Generate, measure and write metrics.json, report.md, grid.png and loss_curve.png into `out_dir`.
    `after_images`: after-images the training workers drew with `delta_path` (see `generate_before_after`)."""
    from .clip import ClipScorer

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.eval_seed if seed is None else seed
    groups = world.eval_groups(cfg.concept, cfg.eval_images, seed)
    from .console import say

    say(f"[evaluate] generating {sum(len(g.prompts) for g in groups)} prompts x (before, after) "
        f"in {len(groups)} groups")
    images = generate_before_after(groups, model_path, delta_path, cfg, seed, num_actors, after_images)
    metrics = M.measure_groups(groups, images, cfg.concept, ClipScorer.load(clip_name), world.judge(), world)
    metrics["wall_seconds"] = time.time() - t0
    metrics["config"] = to_dict(cfg)
    if extra:
        metrics.update(extra)
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", R.report_markdown(metrics, groups, world.judge_note))
    save_before_after_grid(groups, images, out / "grid.png")
    if train_history:
        R.plot_losses(train_history, out / "loss_curve.png")
    return metrics


def save_before_after_grid(groups: list[EvalGroup], images: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """The first two prompts of each group: before | after, labelled with group and prompt."""
    rows, labels = [], []
    for g in groups:
        for i in range(min(2, len(g.prompts))):
            rows.append(np.stack([images[g.name][w][i] for w in ("before", "after") if w in images[g.name]]))
            labels.append(f"{g.name}: {g.prompts[i]}"[:44])
    save_grid(rows, path, scale=3, labels=labels)
