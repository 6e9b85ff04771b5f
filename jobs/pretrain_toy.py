"""Rebuild the bundled toy world (probe, tiny CLIP, tiny Stable Diffusion) from a seed.

    python jobs/pretrain_toy.py                       # everything, into rayablate/toyworld/weights
    python jobs/pretrain_toy.py --stages data probe   # selected stages; finished stages are skipped
    python jobs/pretrain_toy.py --memorize            # only the memorized image (2-4 min on 2 cores)

The memorize stage fine-tunes the bundled SD's transformer blocks so that "the zorb poster"
reproduces one render (a close-up of a purple striped zorb, toyworld/world.py: memorized_image), with
ordinary and loose captions held to the base model's predictions. It writes weights/memorized/:
delta.safetensors (fp16, ~2.8 MB), reference.png and memorized.json (the memorization rate it
measured). `--model toy:memorized` names the result (configs/memorized_zorb_poster.yaml).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from rayablate.toyworld import BUNDLE_DIR
    from rayablate.toyworld.pretrain import STAGES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/pretrain_toy", help="intermediate files and resumable checkpoints")
    ap.add_argument("--output-dir", default=str(BUNDLE_DIR), help="where the bundle is written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=20000, help="renders in the training set")
    ap.add_argument("--sd-steps", type=int, default=5000, help="UNet + text encoder training steps")
    ap.add_argument("--sd-minutes", type=float, default=None, help="stop SD training after this many minutes")
    ap.add_argument("--probe-steps", type=int, default=1000)
    ap.add_argument("--clip-steps", type=int, default=1200)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--memorize-steps", type=int, default=400)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--memorize", action="store_true", help="run only the memorize stage (same as --stages memorize)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest when processes share cores)")
    ap.add_argument("--snapshot", action="store_true",
                    help="export the latest SD checkpoint's EMA weights into the bundle (while training goes on)")
    ap.add_argument("--skip-quality", action="store_true", help="do not print the quality table at the end")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from rayablate.toyworld import pretrain

    t = time.time()
    if args.memorize:
        args.stages = ["memorize"]
    if args.snapshot:
        pretrain.snapshot_sd(Path(args.work_dir))
        args.stages = ["export"]
    pretrain.run(args.work_dir, args.output_dir, seed=args.seed, n_images=args.num_images, sd_steps=args.sd_steps,
                 sd_minutes=args.sd_minutes, stages=args.stages, probe_steps=args.probe_steps,
                 clip_steps=args.clip_steps, vae_steps=args.vae_steps, memorize_steps=args.memorize_steps)
    print(f"pretraining took {(time.time() - t) / 60:.1f} min", flush=True)
    if "export" in args.stages and not args.skip_quality:
        from rayablate.pipeline import load_pipeline
        from rayablate.toyworld import bundle_paths
        from rayablate.toyworld.probe import ProbeJudge
        from rayablate.toyworld.quality import format_table, quality_table

        paths = bundle_paths(args.output_dir)
        rows = quality_table(load_pipeline(paths["sd"]), ProbeJudge(paths["probe"]))
        print(format_table(rows))
        Path(args.work_dir, "quality.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
