"""One concept end to end on Ray: resolve models, check inputs, Ray Data -> Ray Train -> evaluation.

`run_concept` is the one concept pipeline: `ablate` (jobs/train.py), a batch's concept task and a
Tune trial all go through it, with options for what differs (docs/design.md#data-flow).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from .config import AblationConfig, ConfigError, save_config
from .prompts import anchor_label
from .report import console_summary
from .resources import OWNED_RAY_ENV, TUNE_GC_ENV
from .worlds import PromptWorld, world_for


@dataclasses.dataclass
class Models:
    model_path: str  # a local diffusers folder or a hub id
    clip: str  # a toy-CLIP folder or an open_clip "ARCH/PRETRAINED" name
    world: PromptWorld  # where prompts, CLIP texts and the judge come from


def resolve_models(cfg: AblationConfig) -> Models:
    """The bundled toy world where the config names no model, `toy:v2` (world v2's bundle) or
    `toy:memorized` (the v1 toy SD with a memorized image), or a toy bundle's `sd` folder; the
    config's models otherwise. A memorized concept's world judges replicas."""
    from .memorized import world_for_spec
    from .pipeline import PipelineLoadError, looks_like_path
    from .toyworld import TOY_MEMORIZED, bundle_paths, memorized_model, toy_bundle_of

    named_toy = not cfg.model or cfg.model.startswith("toy:")
    if not named_toy and looks_like_path(cfg.model) and not Path(cfg.model).expanduser().exists():
        raise PipelineLoadError(f"model path does not exist: {Path(cfg.model).expanduser()}")
    try:
        found = toy_bundle_of(cfg.model)  # (world, bundle folder) of a toy model
        toy_paths = bundle_paths(found[1], world=found[0]) if found else None if cfg.clip else bundle_paths()
        model = str(memorized_model()) if cfg.model == TOY_MEMORIZED else \
            str(toy_paths["sd"]) if named_toy else cfg.model
    except (FileNotFoundError, ValueError) as e:
        raise PipelineLoadError(f"model: {e}") from e
    clip = cfg.clip or str(toy_paths["clip"])
    world = world_for(cfg.model, str(toy_paths["probe"]) if found else None)
    return Models(model, clip, world_for_spec(world, cfg.concept))


def check_inputs(cfg: AblationConfig, models: Models, user_data: str | None = None) -> int:
    """Everything that can be checked before any output is written. Returns the model's resolution."""
    check_model(models.model_path)
    pairs = models.world.caption_pairs(cfg.concept, 1, cfg.seed)  # raises ConfigError without prompts
    if not pairs:
        raise ConfigError("concept.prompts", "the prompt list is empty")
    check_prompt_lengths(cfg.concept, models.model_path)
    resolution = _model_resolution(models.model_path)
    if cfg.concept.kind == "memorized":
        from .memorized import load_reference

        load_reference(cfg.concept.reference_image, resolution)  # a readable image of the model's size
    if user_data:
        from .data import load_user_rows

        load_user_rows(user_data, cfg.concept, models.world, resolution)  # validates every row; needs no Ray
    return resolution


WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model(model_path: str, field: str | None = None) -> None:
    """A local model folder must be a diffusers pipeline whose weights are safetensors: pickled
    weights (.bin, .ckpt, ...) are refused, since loading them can run code. Hub ids pass (they are
    resolved, safetensors only, when the pipeline loads). With `field` (a second model a flag or
    setting names: `--base-model`, `retrained_model`) the refusal is a ConfigError naming it."""
    from .pipeline import PipelineLoadError

    try:
        _check_model(model_path)
    except PipelineLoadError as e:
        if field is None:
            raise
        raise ConfigError(field, str(e)) from None


def _check_model(model_path: str) -> None:
    from .pipeline import PipelineLoadError, looks_like_path

    if not looks_like_path(model_path):
        return
    path = Path(model_path).expanduser()
    if not path.exists():
        raise PipelineLoadError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise PipelineLoadError(f"not a diffusers pipeline (a file, not a folder with model_index.json): {path}")
    index_path = path / "model_index.json"
    if not index_path.exists():
        raise PipelineLoadError(f"not a diffusers pipeline (no model_index.json): {path}")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineLoadError(f"not a diffusers pipeline (unreadable model_index.json): {path}: {e}") from e
    if not isinstance(index, dict) or "unet" not in index or "vae" not in index:
        raise PipelineLoadError(f"not a Stable Diffusion pipeline (model_index.json names no unet and vae): {path}")
    for comp in WEIGHT_COMPONENTS:
        if not isinstance(index.get(comp), list) or index[comp][0] is None:
            continue  # absent, or null in model_index.json
        folder = path / comp
        if not (folder / "config.json").exists():
            raise PipelineLoadError(f"not a diffusers pipeline: {comp}/config.json is missing in {path}")
        if any(folder.glob("*.safetensors")):
            continue
        pickled = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise PipelineLoadError(f"{path / comp} holds only pickled weights ({', '.join(pickled)}); rayablate "
                                    "loads safetensors only, since loading a pickle can run code: convert the "
                                    "weights to safetensors (save_pretrained(safe_serialization=True))")
        raise PipelineLoadError(f"not a diffusers pipeline: {path / comp} holds no weights (*.safetensors)")


def check_prompt_lengths(spec, model_path: str) -> None:
    """Refuse prompts longer than the model's tokenizer takes (77 tokens for SD's CLIP, 24 for the toy
    world): CLIP would cut the rest off silently, and the concept with it when it comes late."""
    from .pipeline import PipelineLoadError, looks_like_path
    from .prompts import read_prompt_file

    path = Path(model_path).expanduser()
    if not looks_like_path(model_path) or not (path / "tokenizer").is_dir():
        return  # hub ids: checked when the tokenizer is at hand (truncated at sampling otherwise)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except (OSError, ValueError) as e:
        raise PipelineLoadError(f"not a diffusers pipeline: unreadable tokenizer in {path}: {e}") from e
    limit = int(tok.model_max_length)
    named = [(f"concept.prompts[{i}]", p) for i, p in enumerate(spec.prompts)]
    if spec.prompt_file:
        named += [(f"concept.prompt_file ({spec.prompt_file}) line {i + 1}", p)
                  for i, p in enumerate(read_prompt_file(spec.prompt_file))]
    named += [(f"concept.templates[{i}]", t.format(w)) for i, t in enumerate(spec.templates)
              for w in (spec.target, spec.anchor) if w]
    if spec.kind == "memorized":
        named += [("concept.target", spec.target)] + [(f"concept.anchor_prompts[{i}]", a)
                                                      for i, a in enumerate(spec.anchor_prompts)]
    for field, text in named:
        n = len(tok(text, truncation=False, verbose=False).input_ids)
        if n > limit:
            raise ConfigError(field, f"is {n} tokens long; the model's tokenizer takes at most {limit} "
                                     f"(start and end tokens included) and would silently cut off the rest: "
                                     f"shorten it: {text[:80]!r}...")


def prepare_output(cfg: AblationConfig, out: str | Path, models: Models, user_data: str | None = None,
                   config_name: str = "config.yaml") -> tuple[Path, int, AblationConfig]:
    """Check the output folder and every input before anything is written, choose the automatic
    neighbours (`resolve_neighbours`), then create the folder and save the config into it.
    Returns (the resolved folder, the model's resolution, the config to run)."""
    out = Path(out).expanduser().resolve()
    check_output_dir(out)
    resolution = check_inputs(cfg, models, user_data)
    cfg = resolve_neighbours(cfg, models)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / config_name)
    return out, resolution, cfg


def resolve_neighbours(cfg: AblationConfig, models: Models, exclude: list[str] = (), side=None,
                       log=None) -> AblationConfig:
    """The config with `concept.auto_neighbours` resolved into concept.neighbours (rayablate/neighbours.py;
    `exclude`: concepts that may not be chosen, `side`: an already loaded TextSide)."""
    from .neighbours import describe, with_auto_neighbours

    resolved, chosen = with_auto_neighbours(cfg, models.world, side or models.model_path, exclude)
    if chosen:
        (log or _say)(f"auto neighbours of {cfg.concept.target!r}: {describe(chosen)} (cosine in the text conditioning)")
    return resolved


def _model_resolution(model_path: str) -> int:
    p = Path(model_path)
    try:
        unet = json.loads((p / "unet" / "config.json").read_text())
        vae = json.loads((p / "vae" / "config.json").read_text())
        size = unet["sample_size"]
        size = size[0] if isinstance(size, list) else size
        return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError):
        return 512


def check_output_dir(out: Path) -> None:
    """The output folder (or its nearest existing parent) must be a folder this process can write
    in: a file is created and removed there, which also catches read-only mounts and root."""
    import tempfile

    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path exists and is not a folder: {out}")
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    if not probe_dir.is_dir():
        raise NotADirectoryError(f"output folder {out} would lie under {probe_dir}, which is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".rayablate-write-test-", dir=probe_dir)
    except OSError as e:
        raise PermissionError(f"output folder is not writable: {out} ({probe_dir}: {e.strerror or e})") from e
    os.close(fd)
    os.unlink(name)


# Output folders and Ray Train run folders this process writes to: after an interrupt, the CLI
# removes what an interrupted write left there (`remove_partial_outputs`).
TOUCHED: list[tuple[Path, Path | None]] = []


def remove_partial_outputs(out: Path, run_dir: Path | None = None) -> list[Path]:
    """Remove what interrupted writes leave behind: temporaries of atomic writes (`*.tmp`,
    `*.tmp.png`, the `data.tmp/` folder) and Ray Train checkpoint folders that the run's snapshot
    does not list (an upload cut off mid-way; Ray never resumes from those). Returns what went."""
    import shutil

    gone = []
    if out.is_dir():
        gone += [p for p in out.iterdir() if p.name.endswith((".tmp", ".tmp.png"))]
    if run_dir is not None and run_dir.is_dir():
        from .train import read_snapshot

        listed: set[str] = set()
        try:
            listed = {r["checkpoint_dir_name"] for r in read_snapshot(run_dir)["checkpoint_results"]}
        except (KeyError, TypeError):
            pass  # no snapshot: Ray resumes from no checkpoint, so every folder is unused
        gone += [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name not in listed]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


# Ray Train's settings for a one-node local Ray (see init_ray); tests' module Rays use them too.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       "RAY_TRAIN_METRICS_ENABLED": "0"}
# ... and for a local Ray this process started and owns (its fits drop two helper actors).
LOCAL_TRAIN_ENV = {**LOCAL_RAY_TRAIN_ENV, OWNED_RAY_ENV: "1"}


# A local Ray's dashboard: its full head starts subprocess modules that serve the web UI and the
# state API (1.7 s of CPU at start on 2 cores in a cold job's profile). Ray Train's placement-group
# cleaner, the only user of the state API here, is left out of the fits a job's driver starts on the
# Ray it owns (`train._owned_ray_trainer`), so jobs/train.py and jobs/evaluate.py start the minimal
# head (no web UI): 8 paired cold default jobs, 1.9 s less wall at the median, 7 of 8 faster
# (session 33). Tune and batch keep the full one: their fits run inside Ray tasks and keep the
# cleaner. DASHBOARD_ENV=1 keeps it for any job (e.g. to watch it at 127.0.0.1:8265).
DASHBOARD_ENV = "RAYABLATE_DASHBOARD"


# What a job's driver imports after Ray is up, for its evaluation: open_clip (the CLIP metrics) and
# torchmetrics' KID, 1.5 s of one core in a cold job, at its end, when the training workers are done
# and nothing else runs. A local Ray's start leaves the driver waiting 2.5-3.5 s on processes it
# spawns (0.3 s of the driver's CPU), so `init_ray(warm=...)` imports them on a thread meanwhile.
# Neither imports ray (a thread importing what ray.init imports on the main thread could meet it
# half-initialised).
DRIVER_WARM_MODULES = ("open_clip", "torchmetrics.image.kid")


def _import_quietly(modules) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - whoever needs it imports it again and sees the error
            pass


def stop_autoscaler_monitor() -> int | None:
    """Kill the autoscaler monitor of the local Ray this process started; its pid, or None (no such
    Ray, or the monitor already gone).

    `ray.shutdown()` stops a local Ray's processes in turn: the raylet, the GCS, then the monitor with
    SIGTERM and one second's grace. The monitor's SIGTERM handler first reports the termination to
    the GCS, which is already gone, so it never exits within that second and is killed with SIGKILL
    after it: every local Ray's shutdown waited 1.0 s on it (ray 2.60, measured by timing each
    process type's stop). A local Ray autoscales nothing, and the monitor holds nothing to save;
    killing it first is what the shutdown ends up doing a second later. Private API of Ray as pinned
    (`_global_node.all_processes`); any surprise leaves the shutdown to Ray as before."""
    try:
        import ray._private.worker as ray_worker
        from ray._private import ray_constants

        node = ray_worker._global_node
        infos = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []
        for info in infos:
            process = info.process
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
                return process.pid
    except Exception:  # noqa: BLE001 - Ray's own shutdown still stops it
        pass
    return None


def shutdown_ray() -> None:
    """`ray.shutdown()`, a second sooner for a local Ray (`stop_autoscaler_monitor`)."""
    import ray

    stop_autoscaler_monitor()
    ray.shutdown()


def init_ray(num_cpus: int | None = None, dashboard: bool = True, warm: tuple[str, ...] = ()):
    """Join the cluster at RAY_ADDRESS, or start a local Ray (a quiet job's console stays quiet),
    with the dashboard's full head, or with `dashboard=False` its minimal one (DASHBOARD_ENV).
    `warm`: modules (none of them importing ray) imported on a thread while a local Ray starts."""
    import ray

    if ray.is_initialized():
        return ray
    import signal
    import threading

    # ray.init replaces the SIGTERM handler with sys.exit; keep the caller's (the CLI's stops cleanly).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    from . import console

    # quiet jobs (rayablate.console): workers' output stays in Ray's logs; their progress comes by the board
    forward = console.is_verbose()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=forward,
                 **({} if forward else {"logging_level": "ERROR"}))
    else:
        # A Ray this process owns has one node and dies with it. Ray Train's controller polls its
        # workers every 2 s by default, so a finished fit waited up to 2 s to be noticed; its
        # preemption watcher (an actor, one more process start before the workers) guards cloud
        # spot nodes a local Ray does not have; its metrics feed a Prometheus nobody scrapes here.
        # OWNED_RAY_ENV: the driver's own fits leave out two more helper actors
        # (`train._owned_ray_trainer`). Set only where the user has not.
        for key, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(key, value)
        # Its workers inherit this environment: each tunes its collector as it imports rayablate
        # (resources.tune_gc). Not a runtime_env setup hook: that made every actor start 0.2 s slower.
        os.environ.setdefault(TUNE_GC_ENV, "1")
        warmer = None
        if warm:
            warmer = threading.Thread(target=_import_quietly, args=(warm,), name="rayablate-warm", daemon=True)
            warmer.start()
        for attempt in (1, 2):
            try:
                # The full dashboard (on 127.0.0.1) serves the state API: Ray Train V2's placement-group
                # cleaner asks it every second whether the trainer is alive; without it, it cannot
                # clean up after a dead trainer and warns on every check (see DASHBOARD_ENV).
                full = dashboard or os.environ.get(DASHBOARD_ENV) == "1"
                ray.init(num_cpus=num_cpus, object_store_memory=512 * 1024 ** 2, log_to_driver=forward,
                         include_dashboard=full, dashboard_host="127.0.0.1",
                         **({} if forward else {"logging_level": "ERROR"}))
                break
            except Exception as e:  # a starved machine can miss the raylet's 30 s start-up deadline
                ray.shutdown()
                if attempt == 2:
                    raise
                print(f"[rayablate] local Ray did not start ({e}); trying once more", flush=True)
        if warmer is not None:
            warmer.join()
        import atexit

        # runs before Ray's own shutdown at exit (registered when ray was imported; atexit is LIFO)
        atexit.register(stop_autoscaler_monitor)
    if not forward:
        console.quiet_libraries()  # ray.init adds console handlers of its own
    if callable(previous):
        signal.signal(signal.SIGTERM, previous)
    return ray


def _say(msg: str) -> None:
    from .console import say

    say(f"[rayablate] {msg}")


def run_concept(cfg: AblationConfig, out: str | Path, models: Models, *, user_data: str | None = None,
                data_dir: str | Path | None = None, clip_threshold: float | None = None, num_actors: int = 1,
                resume: bool = True, run_name: str | None = None, cpus_per_worker: float | None = None,
                max_failures: int = 0, worker_resources: dict | None = None, evaluation: str | None = "full",
                eval_context: dict | None = None, log=_say, started: float | None = None,
                eval_actors: int | None = None) -> dict:
    """One concept into `out`: data -> Ray Train -> evaluation; the one pipeline of train, batch and tune.

    Inputs are checked and Ray is started by the caller (see `ablate`). The data is built into
    out/"data", or read from `data_dir` re-masked at `clip_threshold`. `evaluation` "full":
    `evaluate.evaluate` (metrics.json, report.md, grid.png, loss_curve.png); "quick": in-process
    after-images against eval_context={"groups", "before", "seed"} (a Tune trial); None: none.
    `log` gets each progress line; metrics' wall_seconds count from `started` (default: now).
    `eval_actors`: the evaluation's sampler actors (default `num_actors`).
    Returns {"metrics": dict | None, "train": run_training's dict, "data_dir": Path, "data": data_summary}.
    """
    from .config import concept_name
    from .data import training_source
    from .train import run_training

    t0 = time.time() if started is None else started
    out = Path(out)
    stages = {"setup": time.time() - t0}  # seconds per stage, in metrics.json (benchmarks/overhead.py reads them)
    if cfg.method == "closed-form":
        t = time.time()
        train = _closed_form(cfg, out, models, log)
        data_dir, summary = None, {"closed_form": train["closed_form"]}
        stages["edit"] = time.time() - t
    else:
        t = time.time()
        train_args = dict(run_name=run_name or concept_name(cfg.concept), resume=resume, max_failures=max_failures,
                          cpus_per_worker=cpus_per_worker, worker_resources=worker_resources,
                          after_images=_worker_after_images(cfg, models, evaluation, eval_actors or num_actors))
        data_dir, summary = _concept_data(cfg, out, models, user_data, data_dir, clip_threshold, num_actors, log)
        stages["data"] = time.time() - t
        log(f"2/3 training: {cfg.steps} steps, {cfg.num_workers} workers, ZeRO-{cfg.zero_stage}, "
            f"{cfg.precision}, group {cfg.param_group}")
        t = time.time()
        train = run_training(cfg, training_source(data_dir, clip_threshold), models.model_path, str(out), **train_args)
        stages["training"] = time.time() - t
        stages["training"] -= _after_image_seconds(train)  # the evaluation's images: counted as evaluation
        if train.get("already_trained"):
            log(f"    already trained to step {cfg.steps}: its last checkpoint is the delta (not retrained)")
        else:
            log(f"    trained in {stages['training']:.0f}s (restarts: {train['worker_restarts']})")
    train["stage_seconds"] = stages
    metrics = None
    if evaluation == "full":
        metrics = _full_evaluation(cfg, out, models, train, summary, eval_actors or num_actors, log, t0)
    elif evaluation == "quick":
        from .evaluation import quick_evaluate

        ctx = eval_context or {}
        metrics = quick_evaluate(cfg, models.model_path, train["delta_path"], models.clip, models.world,
                                 ctx["groups"], ctx["before"], ctx["seed"])
    elif evaluation is not None:
        raise ValueError(f"evaluation must be 'full', 'quick' or None, not {evaluation!r}")
    return {"metrics": metrics, "train": train, "data_dir": data_dir, "data": summary}


def _worker_after_images(cfg, models: Models, evaluation: str | None, eval_actors: int) -> dict | None:
    """The after-images the training workers draw for a full evaluation (`train.draw_after_images`),
    and the before-images the base-image cache lacks, on CPUs only: on GPUs a worker would hold a
    second pipeline beside its training state, and the evaluation's own actors take whole GPUs
    anyway. RAYABLATE_WORKER_AFTER_IMAGES=0 turns it off."""
    if evaluation != "full" or cfg.use_gpu or os.environ.get("RAYABLATE_WORKER_AFTER_IMAGES", "1") == "0":
        return None
    from .evaluation import after_image_plan

    return after_image_plan(cfg, models.world, eval_actors, models.model_path)


def _after_image_seconds(train: dict) -> float:
    """Seconds the training workers spent drawing the evaluation's after-images (0 if they did not)."""
    return (train.get("after_images") or {}).get("seconds", 0.0)


def _closed_form(cfg, out: Path, models: Models, log) -> dict:
    """`method: closed-form`: the least-squares edit in this process, written as the delta training writes."""
    from .closed_form import GROUP, closed_form_edit
    from .pipeline import load_pipeline, write_delta_file
    from .train import DELTA_NAME

    log("1/2 closed-form edit of the cross-attention keys/values (no training)")
    t = time.time()
    pipe = load_pipeline(models.model_path)
    tensors, info = closed_form_edit(pipe, cfg, models.world)
    path = write_delta_file(pipe, tensors, out / DELTA_NAME, GROUP, {"method": "closed-form"})
    log(f"    {info['tensors']} tensors from {info['pairs']} caption pairs and {info['preservation_captions']} "
        f"preservation captions: edit {info['edit_seconds']:.2f}s ({time.time() - t:.1f}s with loading the model)")
    return {"delta_path": str(path), "metrics": [], "worker_restarts": 0, "wall_s": info["edit_seconds"],
            "worker_node_ids": [], "closed_form": info}


def _concept_data(cfg, out: Path, models: Models, user_data, data_dir, clip_threshold, num_actors: int,
                  log) -> tuple[Path, dict]:
    """(shard folder, data_summary): built into out/"data" unless `data_dir` is given."""
    from .data import build_training_data, data_summary

    if data_dir is not None:
        return Path(data_dir), data_summary(data_dir, clip_threshold)
    from .sampling import resolve_sample_precision

    drawn_in = resolve_sample_precision(cfg.sample_precision, cfg.use_gpu)
    log(f"1/3 data: {cfg.num_anchor_images} anchor images ({drawn_in}) + preservation rows, CLIP masks")
    t = time.time()
    data_dir = build_training_data(cfg, models.model_path, models.clip, out / "data", models.world, user_data,
                                   num_actors=num_actors, resolution=_model_resolution(models.model_path))
    summary = data_summary(data_dir)
    log(f"    {summary} in {time.time() - t:.0f}s")
    return data_dir, summary


def _full_evaluation(cfg, out: Path, models: Models, train: dict, summary: dict, num_actors: int, log,
                     t0: float) -> dict:
    from .evaluation import evaluate
    from .files import write_json

    log("2/2 evaluation" if cfg.method == "closed-form" else "3/3 evaluation")
    t = time.time()
    metrics = evaluate(cfg, models.model_path, train["delta_path"], models.clip, out, models.world,
                       train_history=train["metrics"], num_actors=num_actors, after_images=train.get("after_images"),
                       extra={"data": summary, "restarts": train["worker_restarts"],
                              "train_seconds": train["wall_s"], "worker_node_ids": train["worker_node_ids"],
                              **({"closed_form": train["closed_form"]} if "closed_form" in train else {})})
    evaluation = time.time() - t + _after_image_seconds(train)
    metrics["stage_seconds"] = {**train.get("stage_seconds", {}), "evaluation": evaluation}
    metrics["wall_seconds"] = time.time() - t0
    write_json(out / "metrics.json", metrics)
    return metrics


def ablate(cfg: AblationConfig, output_dir: str | Path, user_data: str | None = None, num_actors: int = 1,
           resume: bool = True, run_name: str | None = None, worker_resources: dict | None = None,
           exports: list[str] | None = None, export_rank: int | None = None) -> dict:
    """Ablate one concept; write the delta, metrics.json, report.md, grid.png and loss_curve.png.

    `output_dir` may be an s3:// or gs:// URI: the run writes to a local staging folder and uploads it
    at the end; Ray Train checkpoints then default to `<output_dir>/ray`, so a rerun resumes from there.
    `exports` (rayablate.export.EXPORT_KINDS) are written under `<output_dir>/exports/` after training,
    at `export_rank` (default: the lora group's `lora_rank`, else export.DEFAULT_RANK).
    """
    from .config import concept_name
    from .storage import is_remote

    if is_remote(output_dir):
        return _ablate_remote(cfg, output_dir, user_data, num_actors, resume, run_name, worker_resources,
                              exports, export_rank)
    t0 = time.time()
    models = resolve_models(cfg)
    out, _, cfg = prepare_output(cfg, output_dir, models, user_data)
    storage = cfg.storage_path or str(out / "ray")
    run_dir = Path(storage).expanduser() / (run_name or concept_name(cfg.concept)) if "://" not in storage else None
    remove_partial_outputs(out, run_dir)  # left by a run killed mid-write; the rerun resumes without them
    TOUCHED.append((out, run_dir))
    from .console import log_to

    log_to(out)
    # its fits leave out the placement-group cleaner (DASHBOARD_ENV)
    init_ray(dashboard=False, warm=DRIVER_WARM_MODULES)
    _say(f"ablating {cfg.concept.target!r} -> {anchor_label(cfg.concept.anchor, cfg.concept.anchor_kind)} "
         f"in {models.model_path}")
    result = run_concept(cfg, out, models, user_data=user_data, num_actors=num_actors, resume=resume,
                         run_name=run_name, worker_resources=worker_resources, started=t0,
                         eval_actors=evaluation_actors(cfg, num_actors))
    metrics = result["metrics"]
    if exports:
        rank = export_rank or (cfg.lora_rank if cfg.param_group == "lora" else None)
        add_exports(metrics, out, exports, result["train"]["delta_path"], models.model_path, rank)
    from .console import say

    say(console_summary(metrics))
    return metrics


# Sampler actors of a job's evaluation on CPUs. Each runs one thread on half a CPU, so one actor left
# a 2-core machine's second core idle while 320 images were drawn: two took the default job's
# evaluation from 39 s to 27 s. (The data stage keeps `num_actors`: there two samplers and the CLIP
# actor would hold 1.5 of 2 CPUs, and its 96 rows did not come faster; nor with one sampler on 2
# threads: 17.1 s against 17.8 s, most of the stage is the actor's start-up.)
EVAL_CPU_ACTORS = 2


def evaluation_actors(cfg: AblationConfig, num_actors: int) -> int:
    """The evaluation's actor pool size: at least EVAL_CPU_ACTORS on CPUs; `num_actors` on GPUs
    (each sampler takes a whole GPU)."""
    return num_actors if cfg.use_gpu else max(num_actors, EVAL_CPU_ACTORS)


def add_exports(metrics: dict, out: Path, kinds: list[str], delta_path: str, model_path: str,
                rank: int | None = None) -> dict:
    """Write the exports under out/exports/ (rayablate.export.write_exports), list them in metrics.json
    ("exports": kind, path, rank, relative_error) and in report.md. Returns `metrics`."""
    from .export import write_exports
    from .files import write_json, write_text
    from .report import markdown_table

    if not kinds:
        return metrics
    _say(f"exports: {', '.join(kinds)}")
    metrics["exports"] = write_exports(kinds, delta_path, model_path, out, rank, log=lambda m: _say("    " + m))
    write_json(out / "metrics.json", metrics)
    rows = [[e["kind"], f"`{e['path']}`", e["rank"] or "full",
             "exact" if e["kind"] == "pipeline" else f"{e['relative_error']:.2e}",
             f"{len(e['not_exported'])} tensor(s), e.g. `{e['not_exported'][0]}`" if e["not_exported"] else "–"]
            for e in metrics["exports"]]
    headers = ["kind", "path", "rank", "relative error", "not exported"]
    section = ["", "## Exports", "", markdown_table(headers, rows),
               "", "Relative error: ||ΔW − B·A||_F / ||ΔW||_F over every changed tensor, ΔW = delta − base "
               "(a truncated SVD of the delta; from the lora group it is float error only). lora: "
               "`pipe.load_lora_weights(path)`; kohya: ComfyUI / A1111 `loras` folder; pipeline: `from_pretrained`.", ""]
    report = out / "report.md"
    write_text(report, (report.read_text(encoding="utf-8") if report.exists() else "") + "\n".join(section))
    return metrics


def _ablate_remote(cfg: AblationConfig, uri: str, user_data, num_actors, resume, run_name, worker_resources,
                   exports=None, export_rank=None) -> dict:
    """`ablate` into a local staging folder, uploaded to `uri` at the end."""
    import shutil
    import tempfile

    from .storage import check_remote_dir, upload_dir

    uri = str(uri).rstrip("/")
    check_remote_dir(uri)
    if not cfg.storage_path:
        cfg = dataclasses.replace(cfg, storage_path=f"{uri}/ray")
    staging = Path(tempfile.mkdtemp(prefix="rayablate-out-"))
    try:
        metrics = ablate(cfg, staging, user_data, num_actors, resume, run_name, worker_resources, exports,
                         export_rank)
        files = upload_dir(staging, uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[rayablate] uploaded {len(files)} files to {uri}", flush=True)
    return metrics
