"""What the batch's joint run trains on: each concept's own rows, or rows that name no other target.

    python benchmarks/joint_rows.py                       # configs/batch_v2.yaml, 800 steps, 16 images a group
    python benchmarks/joint_rows.py --steps 1600 --images 32 --output-dir /tmp/jr

One in-process joint run (one matcher, every concept's rows; the job's objective and step, as
`rayablate.api.ablate_rows` trains) per row rule, on the same batch, the same steps and the same
evaluation prompts and seeds, printed side by side:

- **separate**: the rows each concept's separate run trains on, re-anchored for the joint run
  (`batch.run._anchor_every_target`: every batch target a caption names goes to its anchor). The
  batch's rule until session 23. Most of a concept's rows name another target ("a wavy yellow
  tafi" among wavy's), so most rows become ablation rows to a plain shape.
- **exclusive**: rows generated for the joint run with captions that name no other target of the
  batch (`prompt_rows(..., exclude=)`), then re-anchored the same way (a no-op on the toy world). The
  batch's rule in session 23.
- **compositions**: the exclusive rows plus, per concept, the first `--compositions` K ablation rows
  of its own rows that also name another target (`batch.run.composition_rows`), re-anchored ("a red
  checkered zeph" -> "a red plain diamond"), and their counterparts with each removed character's
  kept neighbours (`batch.run.counterpart_rows`: "a red checkered kubo" -> "a red plain kubo").
  The batch's rule with `batch.joint_compositions: K`.

Each concept is measured on its own groups (target, anchor, neighbours, descriptive paraphrases) and
the whole world on every named concept the batch keeps (prompts that name it and no removed
concept), before and after, by the world's probe. In process on purpose: the comparison is of the
rows, and one process on 2 cores runs it in ~15 minutes; `benchmarks/batch_scale.py` measures the
Ray batch itself.

Writes <output-dir>/joint_rows.json and joint_rows.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RULES = ("separate", "exclusive", "compositions")
BAR_TARGET, BAR_KEPT = 0.05, 0.95


def cached_images(pipe, cache, prompts, seeds, steps, guidance):
    """uint8 images of the base `pipe`, served from and kept in the base-image cache."""
    from rayablate.images import decode_png, encode_png
    from rayablate.sampling import sample_images

    rows = [{"prompt": p, "seed": int(s)} for p, s in zip(prompts, seeds)]
    got = cache.pngs(rows, "prompt", steps, guidance) if cache else [None] * len(rows)
    todo = [i for i, g in enumerate(got) if g is None]
    for i in range(0, len(todo), 32):
        part = todo[i:i + 32]
        imgs = sample_images(pipe, [prompts[j] for j in part], [seeds[j] for j in part], steps, guidance)
        for j, im in zip(part, imgs):
            got[j] = encode_png(im)
        if cache:
            cache.store([rows[j] for j in part], [got[j] for j in part], "prompt", steps, guidance)
    return np.stack([decode_png(g) for g in got])


def concept_rows(pipe, cache, cfg, world, clip, exclude):
    """The concept's training rows as the Ray data stage makes them (prompts, seeds, CLIP mask)."""
    from rayablate.data import ClipMasker, masker_kwargs, prompt_rows
    from rayablate.images import encode_png
    from rayablate.method import columns_of

    rows = prompt_rows(cfg, world, exclude)
    imgs = cached_images(pipe, cache, [r["anchor_caption"] for r in rows], [r["seed"] for r in rows],
                         cfg.anchor_steps, cfg.guidance_scale)
    cols = columns_of([dict(r, image=encode_png(im)) for r, im in zip(rows, imgs)])
    return ClipMasker(**masker_kwargs(cfg, world, clip))(cols)


def joint_rows(rule, batch, pipe, cache, world, clip, log, compositions=0):
    from rayablate.batch.run import _anchor_every_target, composition_rows, counterpart_rows, kept_neighbours

    specs = [c.cfg.concept for c in batch.concepts]
    targets = [s.target for s in specs]
    words = [world.concept_words(s) for s in specs]
    swaps = kept_neighbours(batch, [c.name for c in batch.concepts])
    out = []

    def as_rows(cols):
        return [{k: v[i] for k, v in cols.items()} for i in range(len(cols["seed"]))]

    for c in batch.concepts:
        others = [t for t in targets if t != c.cfg.concept.target] if rule != "separate" else []
        rows = as_rows(concept_rows(pipe, cache, c.cfg, world, clip, others))
        if rule == "compositions":
            own = as_rows(concept_rows(pipe, cache, c.cfg, world, clip, []))
            comps = composition_rows(own, [w for t, w in zip(targets, words) if t != c.cfg.concept.target],
                                     compositions)
            rows += comps + counterpart_rows(comps, swaps)
        out += [_anchor_every_target(r, world, specs, words) for r in rows]
    order = np.random.default_rng(0).permutation(len(out))
    log(f"{rule}: {len(out)} rows, {sum(int(r['mask']) for r in out)} of them ablation rows")
    return [out[i] for i in order]


def groups_of(batch, world, n):
    from rayablate.prompts import EvalGroup

    targets = [c.cfg.concept.target for c in batch.concepts]
    groups = [EvalGroup(f"{c.name}/{g.name}", g.concept, g.prompts)
              for c in batch.concepts for g in world.eval_groups(c.cfg.concept, n, c.cfg.eval_seed)]
    kept = [k for k in world.w.concepts() if k not in targets]
    groups += [EvalGroup(f"world/{k}", k, [p for p, _ in world.w.iter_prompts_naming(k, n, 2024 + i,
                                                                                   exclude=sorted(targets))])
               for i, k in enumerate(kept)]
    return groups


def rates(pipe, cache, groups, judge, steps, guidance, seed=1234):
    from rayablate.sampling import prompt_seed

    return {g.name: judge.concept_rate(cached_images(pipe, cache, g.prompts, [prompt_seed(seed, i) for i in
                                                                               range(len(g.prompts))],
                                                     steps, guidance), g.concept) for g in groups}


def summarize(before, after) -> dict:
    kept = {k: after[k] / b for k, b in before.items() if b > 0}
    target = {k: a for k, a in after.items() if k.endswith("/target")}
    own = {k: v for k, v in kept.items() if "/neighbours." in k or k.endswith("/anchor")}
    world = {k: v for k, v in kept.items() if k.startswith("world/")}
    para = {k: a for k, a in after.items() if k.endswith("/paraphrases")}

    def worst(d, f):
        k = f(d, key=d.get)
        return {"value": round(d[k], 4), "group": k}

    return {"target_worst": worst(target, max), "target_mean": round(float(np.mean(list(target.values()))), 4),
            "targets_over_bar": sum(v > BAR_TARGET for v in target.values()),
            "kept_worst": worst(own, min), "kept_mean": round(float(np.mean(list(own.values()))), 4),
            "kept_under_bar": sum(v < BAR_KEPT for v in own.values()), "kept_groups": len(own),
            "world_worst": worst(world, min), "world_under_bar": sum(v < BAR_KEPT for v in world.values()),
            "world_concepts": len(world), "description_leak_worst": worst(para, max)}


def main() -> int:
    ap = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default=str(ROOT / "configs" / "batch_v2.yaml"), help="the batch file")
    ap.add_argument("--steps", type=int, default=None, help="joint steps (default: the batch's joint steps)")
    ap.add_argument("--images", type=int, default=16, help="images per evaluation group (and per kept concept)")
    ap.add_argument("--rules", default=",".join(RULES), help=f"row rules to compare, of {', '.join(RULES)}")
    ap.add_argument("--compositions", type=int, default=None,
                    help="composition rows per concept for the compositions rule (default: the batch's "
                         "joint_compositions, else 4)")
    ap.add_argument("--output-dir", default="outputs/joint_rows")
    args = ap.parse_args()
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if bad or not rules:
        ap.error(f"--rules: unknown rule(s) {', '.join(bad) or '(none)'}; choose from {', '.join(RULES)}")

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from rayablate.api import ablate_rows
    from rayablate.batch.run import batch_models, resolve_batch_neighbours
    from rayablate.batch.spec import joint_config, load_batch
    from rayablate.image_cache import BaseImageCache
    from rayablate.method import columns_of
    from rayablate.pipeline import apply_delta, load_pipeline

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[joint_rows {time.time() - t0:5.0f}s] {msg}", flush=True)

    batch = load_batch(args.batch)
    models = batch_models(batch)
    resolve_batch_neighbours(batch, models, progress=lambda m: None)
    world, judge = models.world, models.world.judge()
    cfg = joint_config(batch, [c.name for c in batch.concepts])
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    base = load_pipeline(models.model_path)
    cache = BaseImageCache.for_model(models.model_path)
    groups = groups_of(batch, world, args.images)
    log(f"{len(batch.concepts)} concepts, {cfg.steps} joint steps, {len(groups)} groups of {args.images} images")
    before = rates(base, cache, groups, judge, cfg.eval_steps, cfg.guidance_scale)
    log("before-images measured")
    results = {}
    for rule in rules:
        rows = joint_rows(rule, batch, base, cache, world, models.clip, log,
                          args.compositions if args.compositions is not None else batch.settings.joint_compositions or 4)
        t = time.time()
        delta = ablate_rows(base, cfg, columns_of(rows), world, progress=False)
        train_s = time.time() - t
        delta.save(out / f"joint_{rule}.safetensors")
        after_pipe = load_pipeline(models.model_path)
        apply_delta(after_pipe, str(out / f"joint_{rule}.safetensors"))
        after = rates(after_pipe, None, groups, judge, cfg.eval_steps, cfg.guidance_scale)
        results[rule] = {"rows": len(rows), "ablation_rows": sum(int(r["mask"]) for r in rows),
                         "train_s": round(train_s, 1), **summarize(before, after),
                         "rates": {g.name: [before[g.name], after[g.name]] for g in groups}}
        log(f"{rule}: trained in {train_s:.0f}s, evaluated")

    def cell(d):
        return f"{d['value']:.2f} ({d['group']})"

    lines = [f"joint run of {args.batch} ({len(batch.concepts)} concepts), {cfg.steps} steps in process, "
             f"{args.images} images a group; bar: target <= {BAR_TARGET}, kept >= {BAR_KEPT} of before", "",
             "| rows | rows (ablation) | target: worst | target: mean | targets over bar | own groups kept: worst | "
             "kept: mean | kept groups under bar | whole world kept: worst | world concepts under bar | "
             "description leak: worst |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rule, r in results.items():
        lines.append(f"| {rule} | {r['rows']} ({r['ablation_rows']}) | {cell(r['target_worst'])} | {r['target_mean']:.3f} | "
                     f"{r['targets_over_bar']} | {cell(r['kept_worst'])} | {r['kept_mean']:.3f} | "
                     f"{r['kept_under_bar']} of {r['kept_groups']} | {cell(r['world_worst'])} | "
                     f"{r['world_under_bar']} of {r['world_concepts']} | {cell(r['description_leak_worst'])} |")
    text = "\n".join(lines) + "\n"
    (out / "joint_rows.md").write_text(text)
    (out / "joint_rows.json").write_text(json.dumps({"batch": args.batch, "steps": cfg.steps, "images": args.images,
                                                      "results": results}, indent=1))
    print(text)
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
