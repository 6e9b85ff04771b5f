"""Batch ablation at scale: do the merged models hold as the number of removed concepts grows?

    python benchmarks/batch_scale.py                                   # configs/batch_v2.yaml, N = 1, 2, 4, 8, 16
    python benchmarks/batch_scale.py --sizes 1,2,4 --eval-images 16 --output-dir /tmp/bs

The curve MACE and UCE report: for each N, the worst target rate (the least-removed concept) and the
worst kept rate (the most-damaged anchor or neighbour, after / before) of the model that removes the
first N concepts of the batch, for three ways of making one model from N concepts:

- **merged**: the least-squares merge of the concepts' separate deltas (`rayablate/merge.py`);
- **sum**: the naive sum of the separate deltas;
- **joint**: one training run over all N concepts' rows, one shared matcher
  (`--joint-steps-per-concept` x N steps, at least 100; 200 a concept, as configs/batch_v2.yaml's
  3200 for 16).

The concepts are taken in an order that mixes characters and styles in every prefix. Every concept's
separate run happens once, in the largest batch; each smaller batch links those runs (a finished
concept is skipped) and makes only its merge, its sum, its joint run and their evaluations. Each
concept is evaluated by its own groups (target, anchor, its neighbours, its descriptive paraphrases)
with the world's probe, on the same prompts and seeds for every variant.

**The whole world kept.** The batch's own evaluation measures each concept's declared neighbours. The
acceptance asks more: every named concept of the world that no concept of the batch removes (the
other characters, the styles left, the shapes, the colours) keeps >= 0.95 of its before-rate. For
each N and each variant, `--world-images` prompts per such concept (prompts that name it and none of
the removed concepts) are drawn before and after in this process and judged by the probe; the table
prints the worst kept rate over the world and which concept it is.

Also printed: the largest batch's wall time against separate `jobs/train.py` runs of its concepts
(`--separate-jobs K` of them are run and timed, K = 0 to skip; the sum over all N is extrapolated
from their mean when K < N, and the table says so).

Writes <output-dir>/batch_scale.json, batch_scale.md and batch_scale.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = ("merged", "sum", "joint")


def interleave(concepts: list[dict]) -> list[dict]:
    """Characters and styles alternated (instance, style, instance, ...), each kind in its file order."""
    inst = [c for c in concepts if c["concept"].get("kind", "style") != "style"]
    sty = [c for c in concepts if c["concept"].get("kind", "style") == "style"]
    out = []
    while inst or sty:
        for part in (inst, sty):
            if part:
                out.append(part.pop(0))
    return out


def sub_batch(spec: dict, concepts: list[dict], joint_steps: int, eval_images: int | None) -> dict:
    s = json.loads(json.dumps(spec))
    s["concepts"] = concepts
    s.setdefault("batch", {}).setdefault("joint_overrides", {})["steps"] = joint_steps
    s["batch"].update({"merge": True, "evaluate_sum": True, "joint": True})
    if eval_images:
        s.setdefault("defaults", {})["eval_images"] = eval_images
    return s


def run(cmd: list[str], log: Path) -> float:
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    return time.time() - t


def worst(summary: dict, variant: str) -> dict:
    """Worst target rate after, worst kept rate (anchor or neighbour) and worst paraphrase rate."""
    rows = [r["variants"].get(variant) for r in summary["concepts"] if r["status"] == "succeeded"]
    rows = [r for r in rows if r]
    if not rows:
        return {}
    kept = [x for r in rows for x in [r.get("anchor_kept"), *[n["kept"] for n in r["neighbours"].values()]]
            if x is not None]
    para = [r["paraphrase_after"] for r in rows if r.get("paraphrase_after") is not None]
    return {"target": max(r["target_after"] for r in rows), "kept": min(kept) if kept else None,
            "paraphrase": max(para) if para else None}


def world_kept(d: Path, targets: list[str], images: int, seed: int = 2024) -> dict:
    """{variant: {"worst": kept, "concept": name, "rates": {concept: [before, after]}}} over every named
    concept of the batch's world that the batch does not remove (see the module docstring)."""
    import torch

    from rayablate.config import load_config
    from rayablate.job import resolve_models
    from rayablate.pipeline import apply_delta, load_pipeline
    from rayablate.sampling import sample_images, prompt_seed

    cfg = load_config(str(d / "concepts" / targets[0] / "config.yaml"))
    models = resolve_models(cfg)
    world, judge = models.world, models.world.judge()
    removed = set(targets)
    kept_concepts = [c for c in world.w.concepts() if c not in removed]
    prompts = {c: [p for p, _ in world.w.iter_prompts_naming(c, images, seed + k, exclude=sorted(removed))]
               for k, c in enumerate(kept_concepts)}
    seeds = [prompt_seed(seed, i) for i in range(images)]
    deltas = {"merged": d / "merged" / "merged_delta.safetensors", "sum": d / "merged" / "sum_delta.safetensors",
              "joint": d / "joint" / "matcher_delta.safetensors"}
    rates = {}
    for variant, delta in [("before", None), *deltas.items()]:
        if delta is not None and not delta.exists():
            continue
        pipe = load_pipeline(models.model_path)
        if delta is not None:
            apply_delta(pipe, str(delta))
        with torch.no_grad():
            rates[variant] = {c: judge.concept_rate(sample_images(pipe, ps, seeds, cfg.eval_steps, cfg.guidance_scale), c)
                              for c, ps in prompts.items()}
    out = {}
    for v in deltas:
        if v not in rates:
            continue
        kept = {c: rates[v][c] / rates["before"][c] if rates["before"][c] > 0 else None for c in kept_concepts}
        valid = {c: k for c, k in kept.items() if k is not None}
        worst_c = min(valid, key=valid.get) if valid else None
        out[v] = {"worst": valid.get(worst_c), "concept": worst_c, "concepts": len(kept_concepts),
                  "rates": {c: [rates["before"][c], rates[v][c]] for c in kept_concepts}}
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayablate.files import atomic

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.4))
    ns = [r["n"] for r in results]
    for v, style in zip(VARIANTS, ("o-", "s--", "^:")):
        a1.plot(ns, [r[v].get("target") for r in results], style, label=v)
        a2.plot(ns, [r[v].get("kept") for r in results], style, label=v)
        a3.plot(ns, [(r.get("world") or {}).get(v, {}).get("worst") for r in results], style, label=v)
    for ax, title, bar in ((a1, "worst target rate after (lower is better)", 0.05),
                           (a2, "worst kept rate, anchors and declared neighbours", 0.95),
                           (a3, "worst kept rate, every concept left in the world", 0.95)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.axhline(bar, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("concepts removed at once")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def world_cell(r: dict) -> str:
    w = r.get("world") or {}
    return " / ".join(f"{fmt(w[v]['worst'])} ({w[v]['concept']})" if v in w else "-" for v in VARIANTS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/batch_v2.yaml", help="the batch file whose concepts are taken")
    ap.add_argument("--sizes", default="1,2,4,8,16", help="numbers of concepts, comma-separated")
    ap.add_argument("--output-dir", default="outputs/bench-batch-scale")
    ap.add_argument("--eval-images", type=int, default=None, help="images per evaluation group (default: the file's)")
    ap.add_argument("--joint-steps-per-concept", type=int, default=200)
    ap.add_argument("--world-images", type=int, default=16,
                    help="prompts per concept left in the world for the whole-world kept check (0: skip)")
    ap.add_argument("--separate-jobs", type=int, default=2,
                    help="separate jobs/train.py runs to time (0: skip; fewer than N: the sum is extrapolated)")
    args = ap.parse_args()

    spec = yaml.safe_load((ROOT / args.config).read_text())
    order = interleave(spec["concepts"])
    sizes = sorted({int(x) for x in args.sizes.split(",")})
    if sizes[-1] > len(order):
        ap.error(f"--sizes: {args.config} has {len(order)} concepts, not {sizes[-1]}")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results, largest = [], None
    for n in sorted(sizes, reverse=True):  # the largest first: it makes every concept's separate run
        d = out / f"n{n:02d}"
        d.mkdir(exist_ok=True)
        if largest is not None:  # link the largest batch's finished concept runs: skipped here
            (d / "concepts").mkdir(exist_ok=True)
            for c in order[:n]:
                name = c["concept"]["target"]
                link = d / "concepts" / name
                if not link.exists():
                    link.symlink_to(largest / "concepts" / name, target_is_directory=True)
        f = d / "batch.yaml"
        f.write_text(yaml.safe_dump(sub_batch(spec, order[:n], max(100, args.joint_steps_per_concept * n),
                                              args.eval_images), sort_keys=False))
        print(f"[batch_scale] N={n}: {', '.join(c['concept']['target'] for c in order[:n])}", flush=True)
        wall = run([sys.executable, "jobs/batch_ablate.py", str(f), "--output-dir", str(d)], d / "batch.log")
        summary = json.loads((d / "summary.json").read_text())
        res = {"n": n, "wall_s": wall, "concepts": [c["concept"]["target"] for c in order[:n]],
               "resumed": any(c.get("skipped") for c in summary["concepts"]),
               **{v: worst(summary, v) for v in VARIANTS}}
        print(f"[batch_scale] N={n}: {wall:.0f}s; " + "; ".join(
            f"{v} target {fmt(res[v].get('target'))} kept {fmt(res[v].get('kept'))}" for v in VARIANTS), flush=True)
        if args.world_images:
            t = time.time()
            res["world"] = world_kept(d, res["concepts"], args.world_images)
            print(f"[batch_scale] N={n}: whole world ({time.time() - t:.0f}s), worst kept of "
                  f"{next(iter(res['world'].values()), {}).get('concepts')} concepts left: " + "; ".join(
                      f"{v} {fmt(w['worst'])} ({w['concept']})" for v, w in res["world"].items()), flush=True)
        results.append(res)
        largest = largest or d
    results.sort(key=lambda r: r["n"])

    sep = []
    n_max = sizes[-1]
    for c in order[:min(args.separate_jobs, n_max)]:
        cdir = out / "separate" / c["concept"]["target"]
        cfg = dict(spec.get("defaults", {}), **c)
        if args.eval_images:
            cfg["eval_images"] = args.eval_images
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        sep.append(run([sys.executable, "jobs/train.py", "--config", str(cdir / "config.yaml"), "--output-dir",
                        str(cdir / "run"), "--no-resume"], cdir / "train.log"))
        print(f"[batch_scale] separate job {c['concept']['target']}: {sep[-1]:.0f}s", flush=True)

    lines = ["| concepts | merged: worst target | merged: worst kept | sum: worst target | sum: worst kept | "
             "joint: worst target | joint: worst kept | description leak, worst (merged / sum / joint) | "
             "whole world, worst kept (merged / sum / joint) | batch wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['n']} | {fmt(r['merged'].get('target'))} | {fmt(r['merged'].get('kept'))} | "
                     f"{fmt(r['sum'].get('target'))} | {fmt(r['sum'].get('kept'))} | {fmt(r['joint'].get('target'))} | "
                     f"{fmt(r['joint'].get('kept'))} | {' / '.join(fmt(r[v].get('paraphrase')) for v in VARIANTS)} | "
                     f"{world_cell(r)} | {r['wall_s']:.0f} s{' (resumed)' if r.get('resumed') and r['n'] == n_max else ''} |")
    timing = {}
    if sep and results[-1]["resumed"]:
        lines += ["", f"The {n_max}-concept batch resumed concept runs an earlier run of this folder had "
                      f"finished, so its {results[-1]['wall_s']:.0f} s are not the whole batch's: run with a fresh "
                      f"--output-dir to compare it with {len(sep)} separate run(s) (mean {sum(sep) / len(sep):.0f} s)."]
    elif sep:
        est = sum(sep) / len(sep) * n_max
        how = "measured" if len(sep) == n_max else f"extrapolated from {len(sep)} measured (mean {sum(sep) / len(sep):.0f} s)"
        timing = {"batch_s": results[-1]["wall_s"], "separate_sum_s": est, "separate_measured_s": sep,
                  "ratio": results[-1]["wall_s"] / est}
        lines += ["", f"Wall time of the {n_max}-concept batch: {results[-1]['wall_s']:.0f} s; {n_max} separate "
                      f"jobs/train.py runs: {est:.0f} s ({how}); batch / separate = {timing['ratio']:.2f}."]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "batch_scale.json").write_text(json.dumps({"results": results, "timing": timing}, indent=1))
    (out / "batch_scale.md").write_text("# Batch ablation at scale\n\n" + table + "\n\n![curve](batch_scale.png)\n")
    plot(results, out / "batch_scale.png")
    print(f"\nwritten: {out / 'batch_scale.md'}, {out / 'batch_scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
