"""Quality bar of a bundled toy world, printed as tables.

    python benchmarks/toy_quality.py [--n 64] [--steps 25]
    python benchmarks/toy_quality.py --world v2        # world v2: all 37 named concepts

1. Attribute probe accuracy per attribute on fresh held-out renders (bar: >= 98 %).
2. Tiny CLIP zero-shot accuracy per attribute on the same renders (bar: >= 90 %).
3. Tiny SD: for each concept of the default ablations (v2: every named concept, and the share when
   prompts use its held-out description instead of its name), the share of n generations that show it
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
    ap.add_argument("--world", choices=("v1", "v2"), default="v1", help="which toy world")
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the world's bundled one)")
    ap.add_argument("--grid", default=None, help="write the first 8 samples per concept as a PNG here")
    ap.add_argument("--concepts", default=None,
                    help="comma-separated concepts (default: v1 the default ablations' concepts, v2 all)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rayablate.clip import ClipScorer
    from rayablate.pipeline import load_pipeline
    from rayablate.toyworld import bundle_paths
    from rayablate.toyworld.pretrain import probe_accuracy
    from rayablate.toyworld.probe import ProbeJudge
    from rayablate.toyworld.quality import DEFAULT_CONCEPTS, clip_zero_shot, format_table, quality_table
    from rayablate.toyworld.world import by_name

    t = time.time()
    w = by_name(args.world)
    paths = bundle_paths(args.bundle, world=args.world)
    judge = ProbeJudge(paths["probe"], world=w)
    images, _, labels = w.sample(args.renders, seed=987654)  # a seed no training stage uses
    from rayablate.images import as_float_nchw

    acc = probe_accuracy(judge.model, as_float_nchw(images), torch.from_numpy(labels))
    print("| attribute | probe accuracy (>= 98 %) | tiny CLIP zero-shot (>= 90 %) |\n|---|---|---|")
    zs = clip_zero_shot(ClipScorer.load(paths["clip"]), images, labels, w)
    for k in ("object", "colour", "pattern"):
        print(f"| {k} | {100 * acc[k]:.1f} % | {100 * zs[k]:.1f} % |")
    print(f"| valid-render head on renders | {100 * acc['valid']:.1f} % | |\n")
    concepts = args.concepts.split(",") if args.concepts else DEFAULT_CONCEPTS if args.world == "v1" else w.concepts()
    rows = quality_table(load_pipeline(paths["sd"]), judge, concepts=concepts, n=args.n, steps=args.steps,
                         guidance=args.guidance, grid=args.grid, held_out=args.world == "v2",
                         progress=lambda i, c: print(f"  ({i + 1}/{len(concepts)}) {c}", file=sys.stderr, flush=True))
    print(format_table(rows))
    print(f"\n({args.n} generations per cell, {args.steps} DDIM steps, guidance {args.guidance}; {time.time() - t:.0f}s)")
    ok = all(r["rate_when_named"] >= 0.9 and r["rate_when_not_named"] <= 0.1 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
