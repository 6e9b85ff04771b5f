"""Rebuild the bundled toy world (probe, tiny CLIP, tiny Stable Diffusion) from a seed.

    python jobs/pretrain_toy.py                       # everything, into rayablate/toyworld/weights
    python jobs/pretrain_toy.py --stages data probe   # selected stages; finished stages are skipped
    python jobs/pretrain_toy.py --memorize            # only the memorized image (2-4 min on 2 cores)
    python jobs/pretrain_toy.py --world v2            # world v2 into rayablate/toyworld/weights_v2,
                                                      # warm-started from the v1 bundle
    python jobs/pretrain_toy.py --world v2 --sd-minutes 40   # one resumable piece of its SD stage
    python jobs/pretrain_toy.py --world v2 --exclude blix    # the retrained reference: v2 without blix

World v2 (rayablate/toyworld/v2.py) has 20 characters, 4 shapes, 8 styles and descriptive
paraphrases. Its defaults differ from v1's: 40,000 renders, 2000 probe and 4000 CLIP steps, a VAE fine-tuned
for 600 steps and a UNet + text encoder for 6000 steps, both from the v1 bundle's weights. Every
stage resumes from --work-dir (the SD stage from its checkpoint, written every 5 minutes), so
--sd-minutes splits the run into pieces; --snapshot exports the newest checkpoint meanwhile.

--exclude retrains the world's SD without some concepts: the renders that show them (and so every
caption that names or describes them) are left out, the probe, tiny CLIP, VAE and tokenizer are
copied from the world's bundle (the same instruments judge both models), and the UNet + text encoder
train from the warm start as the bundle's did. It writes into runs/ (never into the bundle). This is
the reference an ablation is measured against: a model that never learned the concept, so what an
attack brings back from it is what the kept concepts alone can compose (docs/measurements.md).

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
    from rayablate.toyworld import BUNDLE_DIRS
    from rayablate.toyworld.pretrain import STAGES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=("v1", "v2"), default="v1", help="which toy world (default v1, the bundled one)")
    ap.add_argument("--work-dir", default=None,
                    help="intermediate files and resumable checkpoints (default runs/pretrain_toy, runs/pretrain_toy_v2; "
                         "with --exclude, runs/pretrain_toy[_v2]_no-<concepts>)")
    ap.add_argument("--output-dir", default=None, help="where the bundle is written (default: the world's bundled one)")
    ap.add_argument("--warm-start", default=None,
                    help="a bundle folder whose VAE, UNet and text encoder to start from (v2 default: the v1 bundle; "
                         "'none' for random weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=None, help="renders in the training set (v1 20000, v2 40000)")
    ap.add_argument("--sd-steps", type=int, default=None, help="UNet + text encoder training steps (v1 5000, v2 6000)")
    ap.add_argument("--sd-minutes", type=float, default=None, help="stop SD training after this many minutes")
    ap.add_argument("--probe-steps", type=int, default=None, help="v1 1000, v2 2000")
    ap.add_argument("--clip-steps", type=int, default=None, help="v1 1200, v2 4000 (at 1500 its object zero-shot was 80 %%)")
    ap.add_argument("--vae-steps", type=int, default=None, help="v1 1500, v2 600 (warm-started)")
    ap.add_argument("--memorize-steps", type=int, default=400)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--memorize", action="store_true", help="run only the memorize stage (same as --stages memorize)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest when processes share cores)")
    ap.add_argument("--snapshot", action="store_true",
                    help="export the latest SD checkpoint's EMA weights into the bundle (while training goes on)")
    ap.add_argument("--skip-quality", action="store_true", help="do not print the quality table at the end")
    ap.add_argument("--exclude", nargs="+", default=[], metavar="CONCEPT",
                    help="retrain the SD without these concepts (a character, shape, style or colour of --world); "
                         "default --work-dir runs/pretrain_toy_<world>_no-<concepts>, --output-dir <work-dir>/bundle")
    args = ap.parse_args(argv)
    v2 = args.world == "v2"
    for name, (d1, d2) in {"num_images": (20000, 40000), "sd_steps": (5000, 6000), "probe_steps": (1000, 2000),
                           "clip_steps": (1200, 4000), "vae_steps": (1500, 600)}.items():
        if getattr(args, name) is None:
            setattr(args, name, d2 if v2 else d1)
    if args.work_dir is None:  # a folder the user names is used as named
        args.work_dir = "runs/pretrain_toy_v2" if v2 else "runs/pretrain_toy"
        if args.exclude:
            args.work_dir = f"{args.work_dir}_no-{'-'.join(args.exclude)}"
    if args.exclude:
        args.output_dir = args.output_dir or str(Path(args.work_dir, "bundle"))
        if Path(args.output_dir).resolve() in {p.resolve() for p in BUNDLE_DIRS.values()}:
            ap.error("--output-dir: a model retrained with --exclude must not replace a bundled world")
    args.output_dir = args.output_dir or str(BUNDLE_DIRS[args.world])
    if args.warm_start is None:
        args.warm_start = str(BUNDLE_DIRS["v1"]) if v2 else "none"
    warm = None if args.warm_start == "none" else args.warm_start
    if warm and not Path(warm, "sd", "unet").exists():
        ap.error(f"--warm-start: {warm} is not a toy bundle (no sd/unet folder)")
    if args.exclude:
        from rayablate.toyworld import bundle_world
        from rayablate.toyworld.world import by_name

        for c in args.exclude:
            try:
                by_name(args.world).concept_parts(c)
            except KeyError:
                ap.error(f"--exclude: {c!r} is not a concept of world {args.world}")
            if warm:
                try:
                    by_name(bundle_world(warm)).concept_parts(c)
                except KeyError:
                    continue
                ap.error(f"--exclude: the warm start {warm} (world {bundle_world(warm)}) already knows {c!r}; "
                         "give --warm-start none")
        if not {"data", "sd"} <= set(args.stages) and "export" in args.stages and not Path(args.work_dir).exists():
            ap.error("--exclude: the data and sd stages must run before export")
    if args.memorize and v2:
        ap.error("--memorize: the memorized image belongs to world v1")

    import torch

    torch.set_num_threads(args.threads)
    # Tiny values become zero: as the losses fall, subnormal floats in the gradients made the probe stage
    # 5x slower per step on this CPU (0.13 s/step at the start, 0.64 s/step by step 700).
    torch.set_flush_denormal(True)
    from rayablate.toyworld import pretrain

    t = time.time()
    if args.memorize:
        args.stages = ["memorize"]
    if args.snapshot:
        pretrain.snapshot_sd(Path(args.work_dir))
        args.stages = ["export"]
    pretrain.run(args.work_dir, args.output_dir, seed=args.seed, n_images=args.num_images, sd_steps=args.sd_steps,
                 sd_minutes=args.sd_minutes, stages=args.stages, probe_steps=args.probe_steps,
                 clip_steps=args.clip_steps, vae_steps=args.vae_steps, memorize_steps=args.memorize_steps,
                 world_name=args.world, warm_start=warm, exclude=tuple(args.exclude),
                 instruments=str(BUNDLE_DIRS[args.world]) if args.exclude else None)
    print(f"pretraining took {(time.time() - t) / 60:.1f} min", flush=True)
    if "export" in args.stages and not args.skip_quality:
        from rayablate.pipeline import load_pipeline
        from rayablate.toyworld import bundle_paths
        from rayablate.toyworld.probe import ProbeJudge
        from rayablate.toyworld.quality import DEFAULT_CONCEPTS, format_table, quality_table

        from rayablate.toyworld.world import by_name

        w = by_name(args.world)
        paths = bundle_paths(args.output_dir)
        concepts = w.concepts() if v2 else DEFAULT_CONCEPTS
        rows = quality_table(load_pipeline(paths["sd"]), ProbeJudge(paths["probe"], world=w), concepts=concepts,
                             progress=lambda i, c: print(f"quality {i + 1}/{len(concepts)}: {c}", flush=True),
                             grid=str(Path(args.work_dir, "quality_grid.png")), held_out=v2)
        print(format_table(rows))
        Path(args.work_dir, "quality.json").write_text(json.dumps(rows, indent=1))
        print(f"quality table: {Path(args.work_dir, 'quality.json')}; samples per concept: "
              f"{Path(args.work_dir, 'quality_grid.png')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
