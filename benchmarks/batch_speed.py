"""Wall time of N concepts run concurrently against the same N run one after another, in one run.

    python benchmarks/batch_speed.py                       # 4 toy concepts, 2 in flight vs 1, 20 steps each
    python benchmarks/batch_speed.py --concepts 2 --max-concurrent 2 --steps 10

Both legs run the separate concept runs only (data, training, evaluation; no merge or joint run),
with the same configs, on one local Ray instance, into fresh folders. The sequential leg gives its
single run's worker the CPU share a concurrent run's worker gets, so the comparison is of
scheduling, not of per-run parallelism. Prints both wall times and concurrent/sequential speed-up.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONCEPTS = [
    {"concept": {"target": "striped", "anchor": "plain", "kind": "style", "neighbours": ["checkered"]}},
    {"concept": {"target": "dotted", "anchor": "plain", "kind": "style", "neighbours": ["checkered"]}},
    {"concept": {"target": "zorb", "anchor": "circle", "kind": "instance", "neighbours": ["square"]}, "w_pres": 10.0},
    {"concept": {"target": "kubo", "anchor": "square", "kind": "instance", "neighbours": ["circle"]}, "w_pres": 10.0},
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=4, help="N concepts (1-4, from the toy world)")
    ap.add_argument("--max-concurrent", type=int, default=2, help="concepts in flight in the concurrent leg")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-anchor-images", type=int, default=16)
    ap.add_argument("--eval-images", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    import torch

    from rayablate.job import init_ray
    from rayablate.batch import batch_from_dict, run_batch
    from rayablate.resources import cpu_share

    torch.set_num_threads(1)
    init_ray(args.num_cpus)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    cpw = cpu_share(cpus, args.max_concurrent)
    defaults = {"steps": args.steps, "num_workers": 1, "num_anchor_images": args.num_anchor_images,
                "eval_images": args.eval_images, "checkpoint_every": args.steps, "report_every": max(1, args.steps // 2)}
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="batch-speed-"))
    times = {}
    try:
        for leg, k in (("sequential", 1), ("concurrent", args.max_concurrent)):
            data = {"batch": {"max_concurrent": k, "cpus_per_worker": cpw, "merge": False, "joint": False},
                    "defaults": defaults, "concepts": CONCEPTS[:args.concepts]}
            out = work / leg
            if out.exists():
                shutil.rmtree(out)
            t = time.time()
            s = run_batch(batch_from_dict(data), out, progress=lambda m: print(f"  [{leg}] {m}", flush=True))
            times[leg] = time.time() - t
            bad = [r["name"] for r in s["concepts"] if r["status"] != "succeeded"]
            if bad:
                print(f"{leg}: concepts failed: {bad}", file=sys.stderr)
                return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{args.concepts} concepts, {args.steps} steps each, {cpus:.0f} CPUs, {cpw} CPU per training worker")
    print(f"sequential (1 at a time):  {times['sequential']:7.1f} s")
    print(f"concurrent ({args.max_concurrent} at a time):  {times['concurrent']:7.1f} s")
    print(f"speed-up concurrent vs sequential: {times['sequential'] / times['concurrent']:.2f}x "
          f"(concurrent/sequential wall-time ratio {times['concurrent'] / times['sequential']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
