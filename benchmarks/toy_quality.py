"""Quality bar of the bundled toy world, printed as tables.

    python benchmarks/toy_quality.py [--n 64] [--steps 25]

1. Attribute probe accuracy per attribute on fresh held-out renders (bar: >= 98 %).
2. Tiny CLIP zero-shot accuracy per attribute on the same renders (bar: >= 90 %).
3. Tiny SD: for each concept of the default ablations, the share of n generations that show it
   when the prompt names it (bar: >= 90 %) and when it does not (bar: <= 10 %), by the probe.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="generations per prompt set")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--renders", type=int, default=2000, help="held-out renders for probe and CLIP accuracy")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than 1 collapses under contention)")
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the bundled one)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rayablate.clip import ClipScorer
    from rayablate.pipeline import load_pipeline
    from rayablate.toyworld import bundle_paths, world
    from rayablate.toyworld.pretrain import probe_accuracy
    from rayablate.toyworld.probe import ProbeJudge
    from rayablate.toyworld.quality import clip_zero_shot, format_table, quality_table

    t = time.time()
    paths = bundle_paths(args.bundle)
    judge = ProbeJudge(paths["probe"])
    images, _, labels = world.sample(args.renders, seed=987654)  # a seed no training stage uses
    from rayablate.images import as_float_nchw

    acc = probe_accuracy(judge.model, as_float_nchw(images), torch.from_numpy(labels))
    print("| attribute | probe accuracy (>= 98 %) | tiny CLIP zero-shot (>= 90 %) |\n|---|---|---|")
    zs = clip_zero_shot(ClipScorer.load(paths["clip"]), images, labels)
    for k in ("object", "colour", "pattern"):
        print(f"| {k} | {100 * acc[k]:.1f} % | {100 * zs[k]:.1f} % |")
    print(f"| valid-render head on renders | {100 * acc['valid']:.1f} % | |\n")
    rows = quality_table(load_pipeline(paths["sd"]), judge, n=args.n, steps=args.steps, guidance=args.guidance)
    print(format_table(rows))
    print(f"\n({args.n} generations per cell, {args.steps} DDIM steps, guidance {args.guidance}; {time.time() - t:.0f}s)")
    ok = all(r["rate_when_named"] >= 0.9 and r["rate_when_not_named"] <= 0.1 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
