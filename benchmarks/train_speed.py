"""Speed of the training path, measured side by side in one run.

    python benchmarks/train_speed.py [--steps 24] [--batch-size 8] [--skip-e2e]

1. Step time of Ray Train + DeepSpeed ZeRO-2 (1 worker, and 2 workers) against a plain
   single-process PyTorch loop on the same model, objective and per-worker batch: the ratio is
   the overhead the distributed machinery costs (on 2 CPU cores, 2 workers share them).
2. End-to-end wall time of the default job (`python jobs/train.py`), from its metrics.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rows(cfg, n: int) -> list[dict]:
    """Training rows from toy renders (their content does not change the cost of a step)."""
    from rayablate.images import encode_png
    from rayablate.toyworld import world
    from rayablate.toyworld.vocab import ToyWorld

    images, _, _ = world.sample(n, seed=5)
    pairs = ToyWorld().caption_pairs(cfg.concept, n, 0)
    return [{"image": encode_png(im), "target_caption": a, "anchor_caption": b, "mask": int(i % 3 != 0), "seed": i}
            for i, (im, (a, b)) in enumerate(zip(images, pairs))]


def plain_loop(cfg, model_path: str, data: list[dict], steps: int) -> float:
    """Median s/step of the in-process core (`rayablate.method`: plain PyTorch optimizers, one process)."""
    import torch

    from rayablate.method import Ablation, PlainOptimizers, columns_of, train_step
    from rayablate.pipeline import load_pipeline

    torch.set_num_threads(1)
    ablation = Ablation(load_pipeline(model_path), cfg)
    optim = PlainOptimizers(ablation)
    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        chunk = [data[(step * cfg.batch_size + i) % len(data)] for i in range(cfg.batch_size)]
        train_step(ablation, optim, columns_of(chunk), step)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def ray_train(cfg, model_path: str, data: list[dict], out: Path) -> float:
    """Median s/step of the Ray Train + DeepSpeed run, from its reported windows after the first."""
    import ray

    from rayablate.train import run_training

    res = run_training(cfg, ray.data.from_items(data), model_path, str(out), run_name="bench", resume=False)
    windows = [h["s_per_step"] for h in res["metrics"][1:]] or [h["s_per_step"] for h in res["metrics"]]
    return statistics.median(windows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end default job")
    args = ap.parse_args()

    import dataclasses

    from rayablate.job import init_ray, resolve_models, shutdown_ray
    from rayablate.config import AblationConfig

    models = resolve_models(AblationConfig())
    base = dataclasses.replace(AblationConfig(), steps=args.steps, batch_size=args.batch_size, zero_stage=2,
                               report_every=max(1, args.steps // 4), checkpoint_every=10 ** 6)
    data = rows(base, 64)
    tmp = Path(tempfile.mkdtemp(prefix="rayablate-bench-"))
    plain = plain_loop(base, models.model_path, data, args.steps)
    init_ray(num_cpus=2)
    one = ray_train(dataclasses.replace(base, num_workers=1), models.model_path, data, tmp / "w1")
    two = ray_train(dataclasses.replace(base, num_workers=2), models.model_path, data, tmp / "w2")
    shutdown_ray()
    b = args.batch_size
    print(f"\n| setup (batch {b} per worker, {args.steps} steps, toy model) | s/step | vs plain PyTorch |")
    print("|---|---|---|")
    print(f"| in-process core (rayablate.method, plain PyTorch), 1 process | {plain:.3f} | 1.00 |")
    print(f"| Ray Train + DeepSpeed ZeRO-2, 1 worker | {one:.3f} | {one / plain:.2f}x step time |")
    print(f"| Ray Train + DeepSpeed ZeRO-2, 2 workers (2x rows per step) | {two:.3f} | "
          f"{two / plain:.2f}x step time, {2 * plain / two:.2f}x rows/s |")
    if not args.skip_e2e:
        out = tmp / "e2e"
        t = time.time()
        r = subprocess.run([sys.executable, "jobs/train.py", "--output-dir", str(out)], cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        wall = time.time() - t
        if r.returncode != 0:
            print(r.stderr[-3000:])
            return 1
        m = json.loads((out / "metrics.json").read_text())
        print(f"\nend-to-end default job (python jobs/train.py): {wall:.0f} s wall "
              f"(job's own wall_seconds {m['wall_seconds']:.0f} s, training {m.get('train_seconds', 0):.0f} s)")
        from rayablate.report import console_summary

        print("what it ablated (concept rate by the probe, before -> after):")
        print(console_summary(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
