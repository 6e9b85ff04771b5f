"""Framework overhead: the Ray job against the in-process core API on the same work, side by side.

    python benchmarks/overhead.py                                   # the default style job
    python benchmarks/overhead.py --config configs/instance_zorb.yaml
    python benchmarks/overhead.py --args "--method closed-form"     # any jobs/train.py flags, both sides

The same ablation is run twice, each in a fresh process, one after the other:

- **ray**: `python jobs/train.py` (a local Ray; Ray Data anchor images and CLIP masks, Ray Train +
  DeepSpeed with the config's workers, Ray Data evaluation, report; with `--no-image-cache`, so it
  draws every image as the in-process side does), with the stage times the job
  writes to metrics.json (`stage_seconds`: setup = Ray start-up and input checks, data, training,
  evaluation);
- **in-process**: the core API of `rayablate.api` in one process with every core (the same rows:
  prompts, seeds, anchor images and CLIP masks; the same steps of the same size: batch_size x
  num_workers rows a step, as the job's workers together train; the same evaluation prompts, seeds
  and images per group), timed per stage the same way (setup = imports and loading the pipeline).

It prints each stage's seconds and the ratio ray / in-process, end to end (the wall time of the
whole command, as a user waits for it) and per stage, and both sides' quality (target rate after,
lowest kept rate of the anchor and neighbours), then writes overhead.json and overhead.md under
--output-dir. Ratios, not seconds, are the numbers to compare across machines. With `--rounds N`
the two sides alternate N times: each cell is then the median over the rounds, each ratio the
median of the rounds' own ratios with their range (one round's end-to-end ratio moved by +-0.06
between two runs of the same code on 2 cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quality(groups: dict) -> dict:
    keep = [g["concept_rate_after"] / max(g["concept_rate_before"], 1e-9) for name, g in groups.items()
            if isinstance(g, dict) and (name == "anchor" or name.startswith("neighbours.")) and "concept_rate_after" in g]
    return {"target": groups["target"].get("concept_rate_after"), "kept_min": min(keep) if keep else None,
            "paraphrase": groups.get("paraphrases", {}).get("concept_rate_after")}


def in_process(args) -> int:
    """The child process of the in-process side: writes stage times and quality to --result."""
    t0 = time.time()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import rayablate
    from rayablate.api import ablate_rows, training_rows
    from rayablate.cli import add_common_flags, config_from_args
    from rayablate.pipeline import load_pipeline
    from rayablate.toyworld import bundle_paths
    from rayablate.worlds import world_for

    parser = argparse.ArgumentParser()
    add_common_flags(parser)
    cfg = config_from_args(parser.parse_known_args(shlex.split(args.job_args))[0])  # the job's config
    world = world_for(cfg.model)
    model, clip = cfg.model or str(bundle_paths()["sd"]), cfg.clip or str(bundle_paths()["clip"])
    pipe = load_pipeline(model)
    stages = {"setup": time.time() - t0}
    t = time.time()
    if cfg.method == "closed-form":
        delta = rayablate.ablate(pipe, cfg.concept, config=cfg, world=world, progress=False)
        stages["edit"] = time.time() - t
    else:
        rows = training_rows(pipe, cfg, world, clip, progress=False)
        stages["data"] = time.time() - t
        t = time.time()
        # the job's rows per step: each of its num_workers workers trains batch_size rows a step
        delta = ablate_rows(pipe, dataclasses.replace(cfg, batch_size=cfg.batch_size * cfg.num_workers), rows, world,
                            progress=False)
        stages["training"] = time.time() - t
    t = time.time()
    after = load_pipeline(model)
    delta.apply(after)
    report = rayablate.evaluate(pipe, after, cfg.concept, world=world, clip=clip, config=cfg)
    stages["evaluation"] = time.time() - t
    Path(args.result).write_text(json.dumps({"stages": stages, "quality": quality(report)}))
    return 0


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
    return time.time() - t0


def table(rounds: list[dict]) -> str:
    """The stage table over `rounds` (each {"ray", "in_process"}): medians, and with several rounds
    the median of the rounds' ratios with their range."""
    def cell(side, k):
        vals = [r[side]["wall_s"] if k == "wall" else r[side]["stages"].get(k) for r in rounds]
        return None if any(v is None for v in vals) else vals

    def ratio(a, b, bold=False):
        rs = [x / y for x, y in zip(a, b)]
        text = f"{median(rs):.2f}x"
        text = f"**{text}**" if bold else text
        return text + (f" ({min(rs):.2f}-{max(rs):.2f})" if len(rs) > 1 else "")

    first = rounds[0]
    n = len(rounds)
    head = "| stage | ray job (s) | in-process (s) | ray / in-process |" if n == 1 else \
        f"| stage | ray job (s, median of {n}) | in-process (s, median of {n}) | ray / in-process (median, range) |"
    lines = [head, "|---|---|---|---|"]
    keys = [k for k in ("setup", "data", "edit", "training", "evaluation")
            if k in first["ray"]["stages"] or k in first["in_process"]["stages"]]
    for k in keys:
        a, b = cell("ray", k), cell("in_process", k)
        if a is None or b is None:
            lines.append(f"| {k} | {a and median(a)} | {b and median(b)} | – |")
        else:
            lines.append(f"| {k} | {median(a):.1f} | {median(b):.1f} | {ratio(a, b) if all(b) else '–'} |")
    a, b = cell("ray", "wall"), cell("in_process", "wall")
    lines.append(f"| **end to end** | {median(a):.1f} | {median(b):.1f} | {ratio(a, b, bold=True)} |")
    qa, qb = rounds[-1]["ray"]["quality"], rounds[-1]["in_process"]["quality"]
    fmt = lambda q: f"target {q['target']:.2f}, kept >= {q['kept_min']:.2f}"  # noqa: E731
    lines += ["", f"quality: ray job {fmt(qa)}; in-process {fmt(qb)}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a concept YAML (default: the default style concept)")
    ap.add_argument("--args", default="", help="more jobs/train.py flags for both sides, e.g. \"--steps 50\" (one flag alone: --args=--robust)")
    ap.add_argument("--output-dir", default="outputs/bench-overhead")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the two sides this many times; report medians (default 1)")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job-args", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_process:
        return in_process(args)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {args.rounds}")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    job_args = (["--config", str(Path(args.config).resolve())] if args.config else []) + shlex.split(args.args)
    rounds = []
    for r in range(1, args.rounds + 1):
        tag = "" if args.rounds == 1 else str(r)
        print(f"[overhead] round {r}/{args.rounds}: ray job: jobs/train.py {' '.join(job_args)}", flush=True)
        # --no-image-cache: the in-process side draws every image, so the job does too (the cache's gain
        # is measured by benchmarks/default_job.py, not counted as less framework overhead)
        # a fresh output folder: a job finds an earlier run's data shards there and skips its data stage
        shutil.rmtree(out / f"ray{tag}", ignore_errors=True)
        wall = run([sys.executable, str(ROOT / "jobs" / "train.py"), *job_args, "--output-dir", str(out / f"ray{tag}"),
                    "--no-resume", "--no-image-cache"], out / f"ray{tag}.log")
        m = json.loads((out / f"ray{tag}" / "metrics.json").read_text())
        res = {"ray": {"wall_s": wall, "stages": m["stage_seconds"], "quality": quality(m)}}
        print(f"[overhead] round {r}/{args.rounds}: ray job {wall:.1f} s; in-process core API on the same work",
              flush=True)
        wall = run([sys.executable, __file__, "--in-process", "--job-args", shlex.join(job_args),
                    "--result", str(out / "in_process.json")], out / f"in_process{tag}.log")
        res["in_process"] = {"wall_s": wall, **json.loads((out / "in_process.json").read_text())}
        print(f"[overhead] round {r}/{args.rounds}: in-process {wall:.1f} s: {res['ray']['wall_s'] / wall:.2f}x",
              flush=True)
        rounds.append(res)
    (out / "overhead.json").write_text(json.dumps(rounds[0] if len(rounds) == 1 else {"rounds": rounds}, indent=1))
    md = table(rounds)
    (out / "overhead.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
