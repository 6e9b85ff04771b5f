"""The `rayablate` command and the argument parsing shared by the scripts in jobs/.

Bad input of any kind (config, model path, prompts, user data, delta, output folder) ends with a
one-line `error: ...` naming the problem and exit code 2, before any output is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2

def _word_list(text: str) -> list[str]:
    """A comma-separated list of words or phrases: 'zorb, kubo' -> ['zorb', 'kubo']."""
    return [w.strip() for w in text.split(",")]


# flag -> config field (dotted); flags keep the spelling diffusers users know where one exists.
OVERRIDES = {
    "target": ("concept.target", str, "the concept to remove"),
    "anchor": ("concept.anchor", str, "what to draw instead"),
    "anchor_kind": ("concept.anchor_kind", str, "text (the --anchor word) | empty (the empty prompt) | blank (a blank "
                                                "canvas) | noise (noise images); the last three take no --anchor"),
    "kind": ("concept.kind", str, "style | instance | prompt (a composition) | unsafe (a category: --members) | "
                                  "memorized (--target is the caption, --reference-image the image)"),
    "members": ("concept.members", _word_list, "kind unsafe: the category's member words, comma-separated "
                                               "(e.g. 'zorb,kubo'); --target then names the category"),
    "neighbours": ("concept.neighbours", _word_list, "concepts that must survive, comma-separated"),
    "auto_neighbours": ("concept.auto_neighbours", int, "also keep the N concepts nearest the target in the model's "
                                                        "text conditioning (from --candidates or a toy world's "
                                                        "concepts; 0: off)"),
    "candidates": ("concept.candidates", _word_list, "what --auto-neighbours chooses from, comma-separated"),
    "reference_image": ("concept.reference_image", str, "kind memorized: the memorized image (PNG/JPEG, the model's "
                                                        "resolution)"),
    "anchor_prompts": ("concept.anchor_prompts", _word_list, "kind memorized: paraphrases of the caption to draw "
                                                             "instead, comma-separated"),
    "clip": ("clip", str, "open_clip 'ARCH/PRETRAINED' or a toy-CLIP folder (default: the bundled toy CLIP)"),
    "method": ("method", str, "train (the trained matcher) | closed-form (a one-shot least-squares edit of the "
                              "cross-attention keys/values in about a second: no training, not robust to attack)"),
    "matcher_init": ("init", str, "config init: where training starts: base | closed-form (the closed-form "
                                  "edit, then trained)"),
    "param_group": ("param_group", str, "matcher parameters: xattn-kv | xattn | embedding | full | lora"),
    "lr_matcher": ("lr_matcher", float, "matcher learning rate (alias --learning_rate)"),
    "lr_disc": ("lr_disc", float, "discriminator learning rate"),
    "steps": ("steps", int, "optimizer steps (alias --max_train_steps)"),
    "batch_size": ("batch_size", int, "rows per worker per step (alias --train_batch_size)"),
    "num_workers": ("num_workers", int, "Ray Train workers"),
    "zero_stage": ("zero_stage", int, "DeepSpeed ZeRO stage 0-3"),
    "precision": ("precision", str, "fp32 | bf16 | fp16 (alias --mixed_precision; fp16 needs a GPU)"),
    "sample_precision": ("sample_precision", str, "auto | fp32 | bf16: what anchor and evaluation images are drawn "
                                                  "in (auto: bf16 on a CPU with native bf16, else fp32)"),
    "clip_threshold": ("clip_threshold", float, "CLIP mask threshold on cosine similarity"),
    "margin": ("margin", float, "contrastive margin"),
    "w_reg": ("w_reg", float, "anchor regularizer weight"),
    "w_pres": ("w_pres", float, "preservation weight"),
    "w_uncond": ("w_uncond", float, "unconditional-prediction preservation weight (robust mode: 30)"),
    "negative_guidance": ("negative_guidance", float, "ESD's eta: ablation rows match eps_0(c) - eta (eps_0(c*) - "
                                                      "eps_0(c)), pushed away from the target (0: off)"),
    "w_con": ("w_con", float, "contrastive weight (0 disables the term)"),
    "w_adv": ("w_adv", float, "adversarial weight (0 disables the discriminator)"),
    "num_anchor_images": ("num_anchor_images", int, "anchor images to generate"),
    "num_preservation_images": ("num_preservation_images", int,
                                "preservation rows: neighbour captions (half) and other captions, kept as they are"),
    "eval_images": ("eval_images", int, "images per evaluation prompt group"),
    "seed": ("seed", int, "random seed"),
    "storage_path": ("storage_path", str, "Ray Train storage: a folder or s3:// / gs:// URI"),
}
ALIASES = {"lr_matcher": ["--learning_rate"], "steps": ["--max_train_steps"], "batch_size": ["--train_batch_size"],
           "precision": ["--mixed_precision"]}


def add_common_flags(ap: argparse.ArgumentParser, output_default: str | None = None) -> None:
    ap.add_argument("--config", help="concept YAML (see configs/); flags below override its fields")
    ap.add_argument("--model", "--pretrained_model_name_or_path", dest="model",
                    help="diffusers folder or hub id (default: the bundled toy pipeline, world v1; toy:v2: the "
                         "bundled world v2, 20 characters and 8 styles; toy:memorized: the toy pipeline with a "
                         "memorized image, see configs/memorized_zorb_poster.yaml)")
    ap.add_argument("--output-dir", default=output_default, help="where results are written")
    for name, (_, tp, help_) in OVERRIDES.items():
        flags = [f"--{name.replace('_', '-')}"] + ALIASES.get(name, [])
        ap.add_argument(*flags, dest=name, type=tp, default=None, help=help_)
    ap.add_argument("--use-gpu", action="store_true", default=None, help="GPU workers and actors")
    ap.add_argument("--verbose", action="store_true",
                    help="show everything on the console: Ray workers' output, Ray Data's operator progress, "
                         "library warnings (by default they go to <output-dir>/logs/)")
    ap.add_argument("--robust", action="store_true", default=None,
                    help="robust ablation: an inner attacker's soft tokens become ablation rows (config: robust: true)")
    add_image_cache_flag(ap)


class _ImageCacheOff(argparse.Action):
    """--no-image-cache: turns the base-image cache off for this process (rayablate/image_cache.py)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .image_cache import ENV

        os.environ[ENV] = "off"
        setattr(namespace, self.dest, True)


def add_image_cache_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-image-cache", action=_ImageCacheOff, nargs=0, default=False,
                    help="draw the base model's anchor and before-images anew instead of reading them from the "
                         "base-image cache ($RAYABLATE_IMAGE_CACHE, default ~/.cache/rayablate/images; "
                         "RAYABLATE_IMAGE_CACHE=off does the same)")


def add_attack_flags(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    """The attack's settings (rayablate.attack); `prefix` is prepended to the group title."""
    g = ap.add_argument_group(f"{prefix}attack", "concept inversion (new token embeddings trained on images of the "
                                                 "concept) and a greedy prompt search; each also runs on the base "
                                                 "model as a sanity check")
    g.add_argument("--attacks", default="inversion,prompt", help="comma-separated: inversion, prompt")
    g.add_argument("--num-vectors", type=int, default=4, help="new token embeddings of the inversion")
    g.add_argument("--attack-steps", type=int, default=600, help="inversion optimizer steps")
    g.add_argument("--attack-batch-size", type=int, default=32, help="inversion batch size")
    g.add_argument("--attack-lr", type=float, default=1e-2, help="inversion learning rate")
    g.add_argument("--t-min", type=int, default=400, help="inversion timesteps from ...")
    g.add_argument("--t-max", type=int, default=1000, help="... to (exclusive)")
    g.add_argument("--init", default="anchor", help="init of the new tokens: anchor, target or random; a "
                                                   "comma-separated list runs one inversion per init")
    g.add_argument("--attack-seeds", default="0",
                   help="inversion seeds (the new tokens' random start, the timesteps and noise it trains on), "
                        "comma-separated: each init runs once per seed, and the report gives each init's mean "
                        "over the seeds and its range ('0,1,2')")
    g.add_argument("--num-references", type=int, default=256, help="reference images (renders or base-model images)")
    g.add_argument("--references", help="a folder of your images of the concept, at the pipeline's resolution")
    g.add_argument("--prompt-length", type=int, default=2, help="tokens the prompt search inserts")
    g.add_argument("--prompt-candidates", type=int, default=64, help="vocabulary tokens tried at each position")
    g.add_argument("--attack-images", type=int, default=None, help="images per attack (default: eval_images)")


def _export_kinds(text: str) -> list[str]:
    """--export: comma-separated kinds of rayablate.export.EXPORT_KINDS."""
    from .export import ExportError, parse_kinds

    try:
        return parse_kinds(text)
    except ExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def add_export_flags(ap: argparse.ArgumentParser) -> None:
    from .export import DEFAULT_RANK, EXPORT_KINDS

    ap.add_argument("--export", type=_export_kinds, default=[], metavar="KINDS",
                    help=f"also write exports under <output-dir>/exports/: {', '.join(EXPORT_KINDS)} "
                         "(comma-separated): lora = a diffusers LoRA folder (pipe.load_lora_weights), kohya = the same LoRA for "
                         "ComfyUI / A1111, pipeline = a full diffusers folder with the delta applied")
    ap.add_argument("--export-rank", type=_positive_int, default=None, metavar="N",
                    help="LoRA rank of the lora/kohya exports (default: the lora group's own rank, exact; "
                         f"{DEFAULT_RANK} for xattn-kv / xattn, a truncated SVD whose error the report states)")


def check_export_flags(kinds: list[str], group: str) -> None:
    """A LoRA export of a group LoRA cannot hold is bad input, refused before anything runs."""
    from .config import ConfigError
    from .export import ExportError, check_exportable

    try:
        check_exportable(kinds, group)
    except ExportError as e:
        raise ConfigError("--export", str(e)) from e


def config_from_args(args):
    from .config import load_config

    overrides = {field: getattr(args, name) for name, (field, _, _) in OVERRIDES.items()}
    overrides["model"] = args.model
    overrides["use_gpu"] = args.use_gpu
    overrides["robust"] = getattr(args, "robust", None)
    return load_config(args.config, overrides)


def _resources(text: str) -> dict:
    """--worker-resources: a JSON object of resource name -> amount."""
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
        raise argparse.ArgumentTypeError('expected a JSON object of resource -> amount, e.g. {"gpu_a10g": 1}')
    return value


def _train(argv) -> int:
    ap = argparse.ArgumentParser(prog="rayablate train", description=(
        "Ablate one concept end to end on Ray: anchor images and CLIP masks (Ray Data), matcher + "
        "discriminator training (Ray Train + DeepSpeed ZeRO), evaluation report. Without arguments it "
        "ablates the bundled toy world's default style concept ('striped' -> 'plain')."))
    add_common_flags(ap)
    ap.add_argument("--user-data", help="extra image-text pairs: a parquet file/folder (columns image, caption) "
                                        "or a folder of images with .txt captions")
    ap.add_argument("--num-actors", type=int, default=1,
                    help="actors per Ray Data stage (anchor generation, CLIP masks); the evaluation uses at "
                         "least 2 on CPUs, so both cores draw")
    ap.add_argument("--no-resume", action="store_true", help="start over instead of resuming from checkpoints")
    ap.add_argument("--worker-resources", type=_resources, default=None, metavar="JSON",
                    help="custom Ray resources each training worker needs, e.g. '{\"gpu_a10g\": 1}' to train "
                         "only on nodes that offer it (see cluster/README.md)")
    add_export_flags(ap)
    ap.add_argument("--attack", action="store_true",
                    help="after training, attack the ablated model (see the attack flags) and add the results "
                         "to metrics.json and report.md")
    add_attack_flags(ap, "--attack: ")
    args = ap.parse_args(argv)

    def run():
        from .job import ablate
        from .config import concept_name

        cfg = config_from_args(args)
        check_export_flags(args.export, cfg.param_group)
        plan = None
        if args.attack:
            from .attack import plan_from_args

            plan = plan_from_args(args, cfg)
        out = args.output_dir or os.path.join("outputs", concept_name(cfg.concept))
        ablate(cfg, out, user_data=args.user_data, num_actors=args.num_actors, resume=not args.no_resume,
               worker_resources=args.worker_resources, exports=args.export, export_rank=args.export_rank)
        if plan is not None:
            attack_run(cfg, plan, Path(out), os.path.join(out, "matcher_delta.safetensors"))
        from .console import is_verbose, say

        curve = "" if cfg.method == "closed-form" else " loss_curve.png,"
        say(f"results in {out}: metrics.json, report.md, grid.png,{curve} matcher_delta.safetensors"
            + (", exports/" if args.export else "") + (", attack_grid.png, attack_images.npz" if plan is not None else "")
            + ("" if is_verbose() else ", logs/ (everything the console did not show)"))

    return guarded(run, args.verbose)


def _evaluate(argv) -> int:
    ap = argparse.ArgumentParser(prog="rayablate evaluate", description=(
        "Evaluate a matcher delta against its base model: before/after generations (Ray Data), concept "
        "rate, CLIP accuracy, CLIP score, KID; writes metrics.json, report.md and grid.png."))
    add_common_flags(ap)
    ap.add_argument("--delta", required=True, help="matcher_delta.safetensors from a training run")
    ap.add_argument("--eval-seed", type=int, default=None, help="seed of the evaluation prompts and noise")
    ap.add_argument("--num-actors", type=int, default=1)
    add_export_flags(ap)
    args = ap.parse_args(argv)

    def run():
        from .job import add_exports, check_model, check_output_dir, DRIVER_WARM_MODULES, init_ray, resolve_models
        from .evaluation import evaluate
        from .pipeline import check_delta_fits, read_delta

        cfg = config_from_args(args)
        models = resolve_models(cfg)
        check_model(models.model_path)
        # refuses pickles, foreign files and deltas of another architecture before anything runs
        check_delta_fits(args.delta, models.model_path)
        check_export_flags(args.export, read_delta(args.delta)[1].get("group", ""))
        out = Path(args.output_dir or "outputs/evaluate")
        check_output_dir(out)
        from .console import is_verbose, log_to, say
        from .report import console_summary

        log_to(out)
        # no fit: nothing asks the state API (job.DASHBOARD_ENV)
        init_ray(dashboard=False, warm=DRIVER_WARM_MODULES)
        metrics = evaluate(cfg, models.model_path, args.delta, models.clip, out, models.world,
                           num_actors=args.num_actors, seed=args.eval_seed)
        add_exports(metrics, out, args.export, args.delta, models.model_path, args.export_rank)
        say(console_summary(metrics))
        say(f"results in {out}: metrics.json, report.md, grid.png" + (", exports/" if args.export else "")
            + ("" if is_verbose() else ", logs/ (everything the console did not show)"))

    return guarded(run, args.verbose)


def attack_run(cfg, plan, out: Path, delta: str | None, base_model: str | None = None,
               retrained_model: str | None = None) -> dict:
    """Attack model (+ delta) for cfg's concept, and `retrained_model` (trained without it) when given;
    write metrics.json's `attack`, report.md, attack_grid.png, attack_images.npz."""
    import torch

    from .attack import run_attacks, write_outputs
    from .clip import ClipScorer
    from .job import resolve_models
    from .pipeline import apply_delta, load_pipeline

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    models = resolve_models(cfg)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    base = load_pipeline(base_model or models.model_path, device=device)
    edited = base
    if delta or base_model:
        edited = load_pipeline(models.model_path, device=device)
    if delta:
        apply_delta(edited, delta)
    retrained = load_pipeline(retrained_model, device=device) if retrained_model else None
    scorer = ClipScorer.load(models.clip) if models.world.judge() is None else None
    say = lambda m: print(f"[rayablate.attack] {m}", flush=True)  # noqa: E731
    group, rows = run_attacks(edited, base, cfg.concept, models.world, plan, scorer, device, say,
                              retrained_pipe=retrained)
    write_outputs(out, group, rows)
    for spread in group["spreads"]:
        say(f"{spread['label']}, seeds {', '.join(map(str, spread['seeds']))}: concept back in {spread['mean']:.0%} "
            f"of images on average, {spread['min']:.0%}-{spread['max']:.0%} by seed")
    worst = group["max_rate"]
    say(f"strongest working attack: concept back in {'n/a' if worst is None else f'{worst:.0%}'} of images; "
        f"failed on the base model: {', '.join(group['failed']) or 'none'}")
    return group


def _attack(argv) -> int:
    ap = argparse.ArgumentParser(prog="rayablate attack", description=(
        "Attack an ablated model and report how much of the concept comes back: concept inversion "
        "(textual inversion of new tokens on images of the concept) and a greedy prompt search over the "
        "vocabulary, each also against the base model (the sanity check). Writes metrics.json (attack), "
        "report.md (robustness section), attack_grid.png and attack_images.npz (every attacked image, for "
        "a second judge) into --output-dir. Runs in this process (no Ray)."))
    add_common_flags(ap)
    ap.add_argument("--delta", help="matcher_delta.safetensors to attack (applied to --model); without it the "
                                    "pipeline --model itself is attacked")
    ap.add_argument("--base-model", help="the unedited model of the sanity check (default: --model)")
    ap.add_argument("--retrained-model",
                    help="a model trained without the concept (for the toy worlds: jobs/pretrain_toy.py --exclude); "
                         "every attack runs against it too, and the report shows what comes back from a model that "
                         "never learned the concept: the floor for an ablation that keeps everything else")
    add_attack_flags(ap)
    args = ap.parse_args(argv)

    def run():
        from .attack import folder_references, plan_from_args
        from .job import _model_resolution, check_model, resolve_models
        from .pipeline import check_delta_fits

        cfg = config_from_args(args)
        plan = plan_from_args(args, cfg)
        models = resolve_models(cfg)
        check_model(models.model_path)
        if plan.references:  # refused before any model loads
            size = _model_resolution(models.model_path)
            folder_references(plan.references, (size, size))
        for field, path in (("--base-model", args.base_model), ("--retrained-model", args.retrained_model)):
            if path:
                check_model(path, field)
        if args.delta:
            check_delta_fits(args.delta, models.model_path)
        out = Path(args.output_dir or "outputs/attack")
        attack_run(cfg, plan, out, args.delta, args.base_model, args.retrained_model)
        print(f"results in {out}: metrics.json (attack), report.md, attack_grid.png, attack_images.npz")

    return guarded(run)


def _tune(argv) -> int:
    ap = argparse.ArgumentParser(prog="rayablate tune", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=(
        "Ray Tune over whole ablation runs: each trial trains (Ray Train + DeepSpeed) and evaluates one\n"
        "config; ASHA stops poor trials after the first rung. Searches clip_threshold, margin, lr_matcher,\n"
        "lr_disc, w_con, w_adv, w_reg, w_pres (and w_robust, robust_lr with --robust).\n"
        "Objective = ablation x preservation - kid_weight x KID; with an attack (--attack-steps, on by\n"
        "default with --robust) ablation = 1 - max(target rate, rate under a concept inversion); with\n"
        "--retrained-model only the rate above that model's under the same attack counts.\n"
        "Then trains the default and the best config to the end and evaluates both on a held-out seed.\n\n"
        "  python jobs/tune.py --num-samples 8\n"
        "  python jobs/tune.py --param lr_matcher=loguniform:1e-4:1e-2 --param w_adv=choice:0,0.02\n"
        "  python jobs/tune.py --space space.yaml --search clip_threshold lr_matcher\n\n"
        "Writes trials.csv, best_config.yaml (jobs/train.py --config takes it), objective_vs_params.png,\n"
        "tune_report.md, tune_summary.json and final/{default,best}/ reports into --output-dir."))
    add_common_flags(ap)
    ap.add_argument("--num-samples", type=int, default=8, help="trials (the first is the base config)")
    ap.add_argument("--space", help="YAML: parameter -> {dist: uniform|loguniform, low, high} | "
                                    "{dist: choice|grid, values: [...]} | a number (fixed)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                    help="override one parameter's prior: loguniform:1e-4:1e-2, uniform:0.2:0.3, choice:0,0.02, "
                         "grid:1,2 or a number")
    ap.add_argument("--search", nargs="+", metavar="NAME", help="search only these parameters (others stay fixed)")
    ap.add_argument("--max-concurrent", type=int, default=0, help="trials at a time (0: as many as the CPUs/GPUs hold)")
    ap.add_argument("--rungs", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="training steps at which trials report, e.g. 50,100 (default: steps/2,steps)")
    ap.add_argument("--trial-eval-images", type=int, default=16, help="images per prompt group in a trial")
    ap.add_argument("--trial-workers", type=int, default=1, help="Ray Train workers per trial")
    ap.add_argument("--kid-weight", type=float, default=1.0)
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--heldout-seed", type=int, default=None,
                    help="evaluation seed of the final default-vs-best comparison (default: eval_seed + 1)")
    ap.add_argument("--scheduler", default="asha", help="asha | fifo")
    ap.add_argument("--no-final", action="store_true", help="skip the held-out default-vs-best comparison")
    ap.add_argument("--attack-steps", type=int, default=None,
                    help="attack every trial's model with a concept inversion of this many steps and put the "
                         "attacked rate in the objective (0: no attack; default: 100 with --robust, else 0)")
    ap.add_argument("--retrained-model", metavar="SD",
                    help="a model trained without the concept (toy worlds: jobs/pretrain_toy.py --exclude): the "
                         "trials' attack runs on it once, and only what a trial's attack brings back above that "
                         "floor counts against it (needs an attack)")
    ap.add_argument("--attack-seeds", default="0",
                    help="run the trials' attack once per seed, comma-separated (e.g. 0,1,2): the attacked rate in "
                         "the objective (and the base model's and the floor's) is the mean over the seeds, so one "
                         "lucky or unlucky inversion does not decide a trial (cost: the attack's time x seeds)")
    ap.add_argument("--user-data", help="extra image-text pairs (as for train)")
    args = ap.parse_args(argv)

    def run():
        from .config import concept_name
        from .tune import TuneSettings, load_space, tune_ablation

        from .attack import parse_attack_seeds

        seeds = parse_attack_seeds(args.attack_seeds)
        cfg = config_from_args(args)
        space = load_space(cfg, args.space, args.param, args.search)
        settings = TuneSettings(num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                                rungs=args.rungs or [], trial_eval_images=args.trial_eval_images,
                                kid_weight=args.kid_weight, search_seed=args.search_seed,
                                heldout_seed=args.heldout_seed, trial_workers=args.trial_workers,
                                scheduler=args.scheduler, final=not args.no_final, attack_steps=args.attack_steps,
                                retrained_model=args.retrained_model, attack_seeds=seeds)
        out = args.output_dir or os.path.join("outputs", "tune-" + concept_name(cfg.concept))
        tune_ablation(cfg, space, settings, out, user_data=args.user_data)
        from .console import is_verbose, say

        say(f"results in {out}: trials.csv, best_config.yaml, objective_vs_params.png, tune_report.md"
            + ("" if is_verbose() else ", logs/ (everything the console did not show)"))

    return guarded(run, args.verbose)


def _pretrain_toy(argv) -> int:
    import runpy

    script = Path(__file__).resolve().parents[1] / "jobs" / "pretrain_toy.py"
    sys.argv = ["pretrain_toy.py", *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "attack": _attack, "tune": _tune, "pretrain-toy": _pretrain_toy}


def guarded(fn, verbose: bool | None = None) -> int:
    """Run `fn`; bad input becomes `error: ...` on stderr and exit code 2. With `verbose` given, `fn`
    runs in that console mode (rayablate.console.session: quiet unless True)."""
    from .clip import ClipLoadError
    from .config import ConfigError
    from .data import DataError
    from .pipeline import DeltaError, PipelineLoadError

    try:
        if verbose is None:
            fn()
        else:
            from .console import session

            with session(verbose):
                fn()
    except (ConfigError, PipelineLoadError, DeltaError, DataError, ClipLoadError, PermissionError,
            NotADirectoryError, FileNotFoundError) as e:
        if os.environ.get("RAYABLATE_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FloatingPointError as e:  # bad settings (a learning rate too high) or bad data: bad input too
        print(f"error: training diverged: {e}; no delta was saved for that step", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Ray may catch the handler's exception and raise a fresh KeyboardInterrupt: the flag says which.
        name = "SIGTERM" if _GOT_SIGTERM else "SIGINT"
        _stop_after_interrupt()
        print(f"error: interrupted ({name}); no half-written file is left. Re-run the same command to resume "
              f"from the latest checkpoint", file=sys.stderr)
        return 128 + (15 if name == "SIGTERM" else 2)
    return 0


def _stop_after_interrupt() -> None:
    """After Ctrl-C or SIGTERM: stop this process's Ray (a local one ends with its workers), then
    remove what interrupted writes left in the output folders."""
    local = not os.environ.get("RAY_ADDRESS")
    ray = sys.modules.get("ray")
    from .job import TOUCHED, remove_partial_outputs, shutdown_ray

    if ray is not None and ray.is_initialized():
        shutdown_ray()

    for out, run_dir in TOUCHED:
        # Workers of a cluster may still be uploading: their checkpoint folders stay (Ray skips them).
        remove_partial_outputs(out, run_dir if local else None)


_GOT_SIGTERM = False


def _sigterm_as_interrupt(signum, frame):
    global _GOT_SIGTERM
    _GOT_SIGTERM = True
    raise KeyboardInterrupt("SIGTERM")


def script(*command: str, entry=None) -> None:
    """A job script's whole process (`jobs/*.py`, the `rayablate` command): `resources.tune_gc`, then
    `entry()` (a script with its own parser, jobs/batch_ablate.py) or else `main` on `command` + the
    command line, then `exit_process` with its code."""
    from .console import native_stderr_to_log
    from .resources import tune_gc

    tune_gc()
    native_stderr_to_log()
    exit_process(entry() if entry is not None else main([*command, *sys.argv[1:]]))


def exit_process(code: int):
    """End a job script's process with `code`. Python's last act is a full garbage collection over
    every object torch, diffusers and Ray created: 1.6-1.7 s of a job's wall time on 2 cores, with
    nothing left to free in a process about to end. Frozen objects are skipped; atexit handlers
    (Ray's shutdown among them) still run, and files still close. Only for a process that ends
    here: a test calling `main` keeps collecting."""
    import gc

    gc.freeze()
    sys.exit(code)


def run() -> None:
    """The `rayablate` console command."""
    script()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: rayablate {" + ",".join(COMMANDS) + "} [--help]\n\n"
              "  train         ablate one concept end to end (Ray Data -> Ray Train + DeepSpeed -> report)\n"
              "  evaluate      evaluate a matcher delta against its base model\n"
              "  attack        attack an ablated model (concept inversion, prompt search) and report what comes back\n"
              "  tune          Ray Tune search of thresholds, margin, learning rates and loss weights\n"
              "  pretrain-toy  rebuild the bundled toy world")
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_BAD_INPUT
    import signal
    import threading

    # SIGTERM (a scheduler stopping the job, `kill PID`) ends a run as Ctrl-C does: cleanly, resumable.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt) if main_thread else None
    try:
        return COMMANDS[argv[0]](argv[1:])
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
