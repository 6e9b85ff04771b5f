"""Entry point: `python jobs/batch_ablate.py CONCEPTS.yaml --output-dir DIR` (see --help).

Starts a local Ray when RAY_ADDRESS is unset; joins the cluster otherwise, so it also runs as
`ray job submit --working-dir . -- python jobs/batch_ablate.py ...`.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DESCRIPTION = """\
Ablate many concepts from one model. Every concept of the batch YAML runs as its own Ray task
(anchor data -> Ray Train + DeepSpeed -> evaluation, like jobs/train.py), at most
--max-concurrent at once; a concept that fails is reported with its error while the others
finish. Then the per-concept deltas are merged into one model (closed-form least squares on the
cross-attention key/value projections, plus the naive sum as a baseline), one joint run trains a
single matcher on every concept's rows, and every model is evaluated on every concept, its
anchor, its neighbours and its held-out paraphrases.

Writes <output-dir>/concepts/<name>/ (one folder per concept, as jobs/train.py writes),
merged/, joint/, summary.json and summary.md. Re-running the same command skips everything that
already finished (failed concepts are tried again).

Exit codes: 0 all concepts succeeded, 1 some failed (the summary says which and why), 2 bad input.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="batch_ablate.py", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concepts", help="batch YAML: `batch:` settings, `defaults:` config fields, `concepts:` list "
                                     "(see configs/batch_toy.yaml)")
    ap.add_argument("--output-dir", required=True, help="where every result is written")
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="concept runs in flight at once (default: the YAML's batch.max_concurrent, else 2)")
    ap.add_argument("--cpus-per-worker", type=float, default=None,
                    help="CPUs per Ray Train worker (default: derived so that one CPU stays free for Ray Data)")
    ap.add_argument("--model", "--pretrained_model_name_or_path", dest="model", default=None,
                    help="diffusers folder or hub id for every concept (default: the YAML's, else the toy bundle)")
    ap.add_argument("--clip", default=None, help="open_clip 'ARCH/PRETRAINED' or a toy-CLIP folder")
    ap.add_argument("--steps", type=int, default=None, help="override every concept's steps")
    ap.add_argument("--eval-images", type=int, default=None, help="override every concept's eval_images")
    ap.add_argument("--num-anchor-images", type=int, default=None, help="override every concept's anchor images")
    ap.add_argument("--no-merge", action="store_true", help="skip the merged (and summed) model")
    ap.add_argument("--no-joint", action="store_true", help="skip the joint run")
    ap.add_argument("--num-actors", type=int, default=1, help="actors per Ray Data stage")
    ap.add_argument("--verbose", action="store_true",
                    help="show everything on the console: every concept run's own lines, Ray's and the "
                         "libraries' output (by default: one line per concept and step, the rest in "
                         "<output-dir>/logs/ and each concept's logs/)")
    from rayablate.cli import add_image_cache_flag

    add_image_cache_flag(ap)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from rayablate.cli import guarded

    result = {}

    def run():
        from rayablate.job import check_output_dir
        from rayablate.batch import load_batch, run_batch

        overrides = {"model": args.model, "clip": args.clip, "steps": args.steps, "eval_images": args.eval_images,
                     "num_anchor_images": args.num_anchor_images}
        settings = {"max_concurrent": args.max_concurrent, "cpus_per_worker": args.cpus_per_worker}
        if args.no_merge:
            settings["merge"] = False
        if args.no_joint:
            settings["joint"] = False
        batch = load_batch(args.concepts, overrides, settings)
        check_output_dir(Path(args.output_dir))
        result["summary"] = run_batch(batch, args.output_dir, num_actors=args.num_actors)

    code = guarded(run, args.verbose)
    if code == 0 and any(r["status"] != "succeeded" for r in result["summary"]["concepts"]):
        return 1
    return code


if __name__ == "__main__":
    from rayablate.cli import script

    script(entry=main)
