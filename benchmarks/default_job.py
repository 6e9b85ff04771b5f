"""The default job against an older commit's, back to back: cold (empty base-image cache) and warm.

    python benchmarks/default_job.py                         # against 55ea195, 2 rounds
    python benchmarks/default_job.py --old 25c0b97 --rounds 3 --args "--config configs/instance_zorb.yaml"
    python benchmarks/default_job.py --old 5c271b8 --args=--robust    # one flag alone: with "="

Each round runs, one after the other on the same machine, each as a fresh process the way a user
types it (`python jobs/train.py ...`):

- **old**: the `--old` commit's job, from a temporary `git worktree` of this checkout;
- **cold**: this checkout's job with an empty base-image cache (a new `RAYABLATE_IMAGE_CACHE`
  folder for the round), so it draws every anchor and before-image;
- **warm**: this checkout's job again, on the cache the cold run filled (a user's second job on
  the same model: a rerun with other settings, another concept sharing groups).

It prints each run's wall time (as the user waits, process start to exit), the job's own stage
times (`stage_seconds` of metrics.json, where the old commit writes them) and its quality (target
rate after, lowest kept rate of anchor and neighbours, held-out paraphrase), then the medians and
the ratios new / old. The machine's speed drifts by a third from day to day: compare the ratios,
not the seconds. Writes default_job.json under --output-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.overhead import quality  # noqa: E402


def timed_job(checkout: Path, out: Path, job_args: list[str], env: dict) -> dict:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    with open(out.with_suffix(".log"), "w") as log:
        rc = subprocess.run([sys.executable, "jobs/train.py", *job_args, "--output-dir", str(out)], cwd=checkout,
                            stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"the job in {checkout} failed (exit {rc}); see {out.with_suffix('.log')}")
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "stages": {k: round(v, 1) for k, v in m.get("stage_seconds", {}).items()},
            "quality": quality(m)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="55ea195", help="the commit to compare with (checked out in a temporary worktree)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of old, cold, warm")
    ap.add_argument("--args", default="", help="jobs/train.py flags for every run, e.g. \"--config configs/instance_zorb.yaml\" (one flag alone: --args=--robust)")
    ap.add_argument("--output-dir", default="outputs/bench-default-job")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    job_args = shlex.split(args.args)
    old_tree = Path(tempfile.mkdtemp(prefix="rayablate-old-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    runs: dict[str, list[dict]] = {"old": [], "cold": [], "warm": []}
    try:
        for i in range(1, args.rounds + 1):
            cache = out / f"image-cache-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            new_env = dict(base_env, RAYABLATE_IMAGE_CACHE=str(cache))
            old_env = dict(base_env, PYTHONPATH=str(old_tree))
            for kind, tree, env in (("old", old_tree, old_env), ("cold", ROOT, new_env), ("warm", ROOT, new_env)):
                r = timed_job(tree, out / f"{kind}{i}", job_args, env)
                runs[kind].append(r)
                q = r["quality"]
                print(f"[default_job] round {i} {kind:4s}: {r['wall_s']:6.1f} s  stages {r['stages']}  target "
                      f"{q['target']:.2f} kept >= {q['kept_min']:.2f} paraphrase {q['paraphrase']}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    print(f"\ndefault job{(' ' + args.args) if args.args else ''}: {args.rounds} rounds, median wall seconds "
          f"(as the user waits)")
    print("| run | median s | each round | new / old (median of the rounds' ratios) |")
    print("|---|---|---|---|")
    for k in ("old", "cold", "warm"):
        ratios = [n["wall_s"] / o["wall_s"] for n, o in zip(runs[k], runs["old"])]
        ratio = "–" if k == "old" else f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})"
        label = {"old": f"old ({args.old})", "cold": "new, empty image cache", "warm": "new, warm image cache"}[k]
        print(f"| {label} | {med[k]:.1f} | {', '.join(str(r['wall_s']) for r in runs[k])} | {ratio} |")
    (out / "default_job.json").write_text(json.dumps({"old": args.old, "args": args.args, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
