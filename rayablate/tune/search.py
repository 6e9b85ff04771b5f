"""Ray Tune over whole single-concept ablation runs.

Each trial is an ablation run: a Ray Train `TorchTrainer` (DeepSpeed matcher + discriminator) started
from inside the Tune function, which is how Ray 2.60's Train V2 composes with Tune, followed by a
short evaluation. Trials train in rungs (by default half the steps, then all of them; a rung resumes
the previous rung's Ray Train checkpoint) and report the objective (`objective.py`) after each rung,
so ASHA stops poor trials early. The training data is built once (anchor images, CLIP similarities);
each trial re-masks it at its own CLIP threshold (`data.apply_threshold`) without generating anything
again, and the base model's "before" images are generated once and shared with every trial.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
from pathlib import Path

import yaml

from ..console import say
from ..config import AblationConfig, ConfigError, config_from_dict, save_config, to_dict
from ..files import write_json, write_text
from .objective import objective_parts
from .report import METRIC_COLUMNS, console_table, fmt_params, plot_objective, report_markdown, write_trials_csv
from .space import Param, apply_params, check_space


# The trials' attack: a concept inversion from the target word (the start that brought zorb back
# most often against robust models) on the high-noise timesteps, short enough to run after every rung.
ATTACK_STEPS = 100
ATTACK = dict(num_vectors=4, batch_size=16, lr=1e-2, t_min=400, t_max=1000, init="target", num_references=64)
ATTACK_SUMMARY = ("label", "num_images", "base_rate", "attack_ok", "floor_rate", "retrained_model")


@dataclasses.dataclass
class TuneSettings:
    num_samples: int = 8
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs (or GPUs) hold
    rungs: list[int] = dataclasses.field(default_factory=list)  # training steps per rung; [] = [steps/2, steps]
    trial_eval_images: int = 16  # images per prompt group in a trial's evaluation
    kid_weight: float = 1.0
    search_seed: int = 0  # the random search's seed
    heldout_seed: int | None = None  # evaluation seed of the final comparison; default eval_seed + 1
    trial_workers: int = 1  # Ray Train workers per trial
    scheduler: str = "asha"  # asha | fifo
    final: bool = True  # train default and best to the end and evaluate them on the held-out seed
    # a concept inversion of this many steps against every trial's model (0: none; None: ATTACK_STEPS
    # in robust mode, else none); its rate joins the objective (objective.py)
    attack_steps: int | None = None
    # a model trained without the concept (toy worlds: jobs/pretrain_toy.py --exclude): the attack runs
    # on it once, and only what a trial's attack brings back above that floor counts (objective.py)
    retrained_model: str | None = None
    # the attack once per seed, and a trial's attacked rate (the base model's, the floor's) is the mean:
    # one inversion is one optimisation, whose rate moved by up to 56 points with its seed on a leaky delta
    attack_seeds: list[int] = dataclasses.field(default_factory=lambda: [0])

    def check(self, cfg: AblationConfig) -> None:
        if self.num_samples < 1:
            raise ConfigError("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.max_concurrent < 0:
            raise ConfigError("max_concurrent", f"must be >= 0, got {self.max_concurrent}")
        if self.trial_eval_images < 2:
            raise ConfigError("trial_eval_images", f"must be >= 2 (KID needs two), got {self.trial_eval_images}")
        if self.trial_workers < 1:
            raise ConfigError("trial_workers", f"must be >= 1, got {self.trial_workers}")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError("scheduler", f"unknown scheduler {self.scheduler!r}; allowed: asha, fifo")
        rungs = self.rung_steps(cfg)
        if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[0] < 1:
            raise ConfigError("rungs", f"must be increasing step counts >= 1, got {rungs}")
        if self.attack_steps is not None and self.attack_steps < 0:
            raise ConfigError("attack_steps", f"must be >= 0 (0: no attack), got {self.attack_steps}")
        from ..attack import check_attack_seeds

        check_attack_seeds(self.attack_seeds, "attack_seeds")
        if self.retrained_model:
            if not self.attack(cfg):
                raise ConfigError("retrained_model", "is the floor of the trials' attack, and this search has none: "
                                                     "give --attack-steps N (or --robust)")
            from ..job import check_model

            check_model(self.retrained_model, "retrained_model")
        if self.heldout(cfg) == cfg.eval_seed:
            raise ConfigError("heldout_seed", f"must differ from the search's evaluation seed ({cfg.eval_seed})")

    def rung_steps(self, cfg: AblationConfig) -> list[int]:
        if self.rungs:
            return [int(r) for r in self.rungs]
        return [max(1, cfg.steps // 2), cfg.steps] if cfg.steps >= 2 else [cfg.steps]

    def attack(self, cfg: AblationConfig) -> int:
        return (ATTACK_STEPS if cfg.robust else 0) if self.attack_steps is None else self.attack_steps

    def heldout(self, cfg: AblationConfig) -> int:
        return cfg.eval_seed + 1 if self.heldout_seed is None else self.heldout_seed


def _quiet(msg: str) -> None:
    """run_concept's progress lines: silent here, since trials run side by side and interleave."""


def run_trial(params: dict, ctx: dict) -> None:
    """The Tune function: train in rungs (each resuming the last), evaluate, report the objective."""
    import torch
    from ray import tune

    from ..job import run_concept

    torch.set_num_threads(1)
    cfg = apply_params(config_from_dict(ctx["base"]), params)
    cfg.num_workers = ctx["trial_workers"]
    trial_dir = Path(ctx["out"]) / "trials" / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "params.json").write_text(json.dumps(params))
    for steps in ctx["rungs"]:
        cfg.steps = steps
        run = run_concept(cfg, trial_dir, ctx["models"], data_dir=ctx["data_dir"], clip_threshold=cfg.clip_threshold,
                          run_name="train", cpus_per_worker=ctx["cpus_per_worker"], evaluation="quick",
                          eval_context=ctx["eval"], log=_quiet)
        parts = objective_parts(run["metrics"], ctx["kid_weight"], _attacked_rate(cfg, run, ctx), _floor(ctx))
        last = run["train"]["metrics"][-1] if run["train"]["metrics"] else {}
        write_json(trial_dir / "progress.json", {"steps": steps, "params": params, **parts})
        tune.report({**parts, "steps": steps, "loss": float(last.get("loss", float("nan"))),
                     "trial_dir": str(trial_dir)})


def _attack_plan(cfg: AblationConfig, steps: int, images: int, seeds: list[int]):
    from ..attack import AttackPlan, InversionSettings

    return AttackPlan(inversions=[InversionSettings(steps=steps, **ATTACK, seed=x) for x in seeds], prompt=None,
                      num_images=images, seed=cfg.eval_seed, steps=cfg.eval_steps, guidance=cfg.guidance_scale)


def _attack_device_and_scorer(cfg: AblationConfig, models):
    """Where the trials' attack runs, and its CLIP judge for a model without a probe (else None)."""
    import torch

    from ..clip import ClipScorer

    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    return device, (ClipScorer.load(models.clip) if models.world.judge() is None else None)


def _attacked_rate(cfg: AblationConfig, run: dict, ctx: dict) -> float | None:
    """The concept's rate under the search's attack against this run's model (None: no attack).
    The references and the base model's sanity run were made once (`_shared_inputs`)."""
    attack = ctx.get("attack")
    if not attack:
        return None
    from ..attack import mean_of, run_attacks
    from ..pipeline import apply_delta, load_pipeline

    models = ctx["models"]
    device, scorer = _attack_device_and_scorer(cfg, models)
    edited = load_pipeline(models.model_path, device=device)
    apply_delta(edited, run["train"]["delta_path"])
    plan = _attack_plan(cfg, attack["steps"], attack["num_images"], attack["seeds"])
    group, _ = run_attacks(edited, None, cfg.concept, models.world, plan, scorer, device, _quiet,
                           base_cache=dict(attack["base_cache"]), refs=attack["refs"])
    return mean_of(group["attacks"], "concept_rate")


def _floor(ctx: dict) -> float | None:
    """The trials' attack's rate on the model retrained without the concept (None: not given)."""
    return (ctx.get("attack") or {}).get("floor_rate")


def _resources(cfg: AblationConfig, settings: TuneSettings) -> tuple[int, float]:
    """(concurrent trials, CPUs per Ray Train worker) for the cluster Ray is connected to."""
    import ray

    from ..resources import cpu_share

    if cfg.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return settings.max_concurrent or max(1, gpus // settings.trial_workers), 1.0
    total_cpu = ray.cluster_resources().get("CPU", 1.0)
    k = settings.max_concurrent or max(1, int(total_cpu // settings.trial_workers))
    return k, cpu_share(total_cpu, k * settings.trial_workers)


# --- the search --------------------------------------------------------------------------------

def tune_ablation(cfg: AblationConfig, space: dict[str, Param], settings: TuneSettings, output_dir: str | Path,
                  user_data: str | None = None) -> dict:
    """Search `space` around `cfg`; write trials.csv, best_config.yaml, objective_vs_params.png,
    tune_report.md and tune_summary.json into `output_dir`. Returns the summary."""
    from ..config import concept_name
    from ..console import log_to
    from ..job import init_ray

    t0 = time.time()
    out, models, resolution, cfg = _prepare(cfg, space, settings, output_dir, user_data)
    log_to(out)  # quiet mode: library output and every console line also into out/logs/job.log
    init_ray()
    k, cpus_per_worker = _resources(cfg, settings)
    rungs = settings.rung_steps(cfg)
    say(f"[tune] {settings.num_samples} trials of {concept_name(cfg.concept)!r}, {k} at a time, "
          f"{settings.trial_workers} worker(s) x {cpus_per_worker} CPU each, rungs {rungs} steps, "
          f"scheduler {settings.scheduler}")
    ctx = _shared_inputs(cfg, models, out, settings, user_data, resolution)
    ctx.update(rungs=rungs, cpus_per_worker=cpus_per_worker)
    attack = ctx.get("attack")
    default_point = {n: getattr(cfg, n) for n, p in space.items() if p.dist not in ("grid", "fixed")}
    tuner = _tuner(space, settings, ctx, k, default_point)
    say("[tune] 3/4 search")
    # Ctrl-C stops the whole job (exit 130; re-run to resume the finished trials' checkpoints), not
    # only the search: Tune's own SIGINT handler would end the search and let the job go on.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    trials = _collect(_fit(tuner), space, rungs, bool(default_point))
    write_trials_csv(out / "trials.csv", trials, space)
    best, default = _pick(trials, rungs)
    best_cfg = apply_params(cfg, best["params"])
    save_config(best_cfg, out / "best_config.yaml")
    plot_objective(trials, space, out / "objective_vs_params.png")
    say(f"[tune]     best trial {best['trial_id']}: objective {best['objective']:.3f} "
          f"({fmt_params(best['params'])})")
    summary = {"concept": concept_name(cfg.concept), "rungs": rungs, "num_trials": len(trials),
               "failed_trials": sum(t["status"] != "ok" for t in trials), "concurrent_trials": k,
               "cpus_per_worker": cpus_per_worker, "kid_weight": settings.kid_weight,
               "search_seed_eval": cfg.eval_seed, "best_search": _public(best),
               "default_search": _public(default) if default else None,
               "attack": {k: attack[k] for k in ATTACK_SUMMARY if k in attack} if attack else None}
    if settings.final:
        summary.update(_final_comparison(cfg, best_cfg, best, default, ctx, out, settings))
    summary["wall_seconds"] = time.time() - t0
    write_json(out / "tune_summary.json", summary)
    write_text(out / "tune_report.md", report_markdown(summary, trials, space))
    say(console_table(summary))
    return summary


def _prepare(cfg: AblationConfig, space: dict[str, Param], settings: TuneSettings, output_dir: str | Path,
             user_data: str | None):
    """Every check before anything is written, then the base config and the space into `output_dir`."""
    from ..job import prepare_output, resolve_models

    settings.check(cfg)
    check_space(cfg, space)
    models = resolve_models(cfg)
    out, resolution, cfg = prepare_output(cfg, output_dir, models, user_data, config_name="base_config.yaml")
    write_text(out / "space.yaml", yaml.safe_dump({k: p.as_dict() for k, p in space.items()}, sort_keys=False))
    return out, models, resolution, cfg


def _shared_inputs(cfg: AblationConfig, models, out: Path, settings: TuneSettings, user_data: str | None,
                   resolution: int) -> dict:
    """What every trial shares, made once: the training data and the base model's before-images."""
    from ..data import build_training_data
    from ..evaluation import generate_before_after

    say("[tune] 1/4 training data (built once; each trial re-masks it at its own CLIP threshold)")
    data_dir = build_training_data(cfg, models.model_path, models.clip, out / "data", models.world, user_data,
                                   resolution=resolution)
    say("[tune] 2/4 base-model images for the trials' evaluation (generated once)")
    groups = models.world.eval_groups(cfg.concept, settings.trial_eval_images, cfg.eval_seed)
    before = {name: imgs["before"] for name, imgs in
              generate_before_after(groups, models.model_path, None, cfg, cfg.eval_seed).items()}
    return {"base": to_dict(cfg), "out": str(out), "data_dir": str(data_dir), "models": models,
            "eval": {"groups": groups, "before": before, "seed": cfg.eval_seed},
            "kid_weight": settings.kid_weight, "trial_workers": settings.trial_workers,
            "attack": _base_attack(cfg, models, settings)}


def _base_attack(cfg: AblationConfig, models, settings: TuneSettings) -> dict | None:
    """The trials' attack, prepared once: its reference images, and its run on the base model (the
    sanity check every trial's rate is read against) and on the retrained model when given (the floor)."""
    steps = settings.attack(cfg)
    if not steps:
        return None
    from ..attack import mean_of, reference_set, run_attacks
    from ..pipeline import load_pipeline

    device, scorer = _attack_device_and_scorer(cfg, models)
    seeds = list(settings.attack_seeds)
    plan = _attack_plan(cfg, steps, settings.trial_eval_images, seeds)
    label = plan.inversions[0].label() + (f", mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
    say(f"[tune]     the trials' attack ({label}) on the base model")
    base = load_pipeline(models.model_path, device=device)
    refs = reference_set(plan, base, cfg.concept, models.world, device)
    cache: dict = {}
    retrained = load_pipeline(settings.retrained_model, device=device) if settings.retrained_model else None
    group, _ = run_attacks(base, base, cfg.concept, models.world, plan, scorer, device, _quiet, cache, refs,
                           retrained_pipe=retrained)
    runs = group["attacks"]
    base_rate = mean_of(runs, "base_rate")
    say(f"[tune]     base model under the attack: concept in {base_rate:.0%} of images")
    out = {"steps": steps, "num_images": settings.trial_eval_images, "refs": refs, "base_cache": cache,
           "seeds": seeds, "label": label, "base_rate": base_rate, "attack_ok": all(a["attack_ok"] for a in runs)}
    if retrained is not None:
        floor = mean_of(runs, "retrained_rate")
        say(f"[tune]     model retrained without the concept under the attack: concept in "
            f"{floor:.0%} of images (the floor: only a trial's rate above it counts)")
        out.update(floor_rate=floor, retrained_model=settings.retrained_model)
    return out


def _tuner(space: dict[str, Param], settings: TuneSettings, ctx: dict, k: int, default_point: dict):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ..console import is_verbose

    rungs = ctx["rungs"]
    # The concurrency limit goes to the generator itself: Tune applies max_concurrent_trials only to
    # Searchers, and silently ignores it for a BasicVariantGenerator passed in.
    searcher = BasicVariantGenerator(points_to_evaluate=[default_point] if default_point else None,
                                     max_concurrent=k, random_state=settings.search_seed)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(rungs), grace_period=1, reduction_factor=2)
                 if settings.scheduler == "asha" and len(rungs) > 1 else FIFOScheduler())
    # The Tune function only orchestrates: its trainer's workers and data tasks reserve the CPUs.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": 0.01})
    return tune.Tuner(
        trainable,
        param_space={n: p.tune_domain() for n, p in space.items()},
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=settings.num_samples,
                                    max_concurrent_trials=k, scheduler=scheduler, search_alg=searcher),
        # quiet (the default): one line per trial report from TrialLines instead of Tune's tables
        run_config=tune.RunConfig(name="search", storage_path=str(Path(ctx["out"]) / "tune"),
                                  verbose=1 if is_verbose() else 0,
                                  callbacks=[] if is_verbose() else [trial_lines(list(space))],
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


def _fit(tuner):
    """tuner.fit(); quiet, Tune's own console output is off. Its new output engine prints the
    experiment's box and paths even at verbose=0, so the quiet mode selects the classic one (which
    prints nothing at verbose=0) for the fit only; TrialLines says what happens instead."""
    from ..console import is_verbose

    if is_verbose():
        return tuner.fit()
    key, old = "RAY_AIR_NEW_OUTPUT", os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ[key] = "0"
    try:
        return tuner.fit()
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def trial_lines(names: list[str]):
    """A Tune callback (in the driver): one console line per trial report, error and early stop."""
    from ray import tune

    class TrialLines(tune.Callback):
        def _label(self, trial) -> str:
            params = {n: trial.config[n] for n in names if n in trial.config}
            return f"trial {trial.trial_id} ({fmt_params(params)})"

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "objective" not in result:
                return
            attacked = f", attacked {result['attacked_rate']:.2f}" if result.get("attacked_rate") is not None else ""
            say(f"[tune]     {self._label(trial)} at {result.get('steps')} steps: objective {result['objective']:.3f} "
                f"(ablation {result.get('ablation', float('nan')):.3f}, preservation "
                f"{result.get('preservation', float('nan')):.3f}{attacked})")

        def on_trial_error(self, iteration, trials, trial, **info):
            err = str(getattr(trial, "error_msg", "") or "").strip().splitlines()
            say(f"[tune]     {self._label(trial)} failed{': ' + err[-1][:160] if err else ''}")

    return TrialLines()


def _pick(trials: list[dict], rungs: list[int]) -> tuple[dict, dict | None]:
    """(best trial among those that reached the last rung, the default config's trial)."""
    ok = [t for t in trials if t["status"] == "ok"]
    if not ok:
        raise RuntimeError(f"every trial failed; first error: {trials[0]['error'] if trials else 'no trials'}")
    finished = [t for t in ok if t["steps"] == rungs[-1]] or ok
    return max(finished, key=lambda t: t["objective"]), next((t for t in trials if t["is_default"]), None)


def _final_comparison(cfg: AblationConfig, best_cfg: AblationConfig, best: dict, default: dict | None, ctx: dict,
                      out: Path, settings: TuneSettings) -> dict:
    say(f"[tune] 4/4 default vs best, trained to {ctx['rungs'][-1]} steps, evaluated on held-out seed "
          f"{settings.heldout(cfg)}")
    final = {}
    for label, c, trial in [("default", cfg, default), ("best", best_cfg, best)]:
        if trial is None or trial["status"] != "ok":
            final[label] = {"error": (trial or {}).get("error", "no trial")}
            continue
        if label == "best" and default is not None and trial["trial_id"] == default["trial_id"] \
                and "objective" in final.get("default", {}):
            # the default won: the same trial, trained and evaluated once
            final["best"] = dict(final["default"], same_as_default=True)
            say("[tune]     best: the default config itself (evaluated above)")
            continue
        final[label] = _final_eval(label, c, trial, ctx, out, settings)
    return {"heldout_seed": settings.heldout(cfg), "final": final}


def _final_eval(label: str, cfg: AblationConfig, trial: dict, ctx: dict, out: Path, settings: TuneSettings) -> dict:
    """Finish the trial's training to the last rung (resuming its checkpoint) and evaluate it in full
    on the held-out seed, into out/final/<label>."""
    from ..job import run_concept

    c = copy.deepcopy(cfg)
    c.num_workers = ctx["trial_workers"]
    c.steps = ctx["rungs"][-1]
    c.eval_seed = settings.heldout(cfg)
    # The trial's own Ray Train run, where run_training put it (under the trial's folder unless the
    # config names a storage path), so the last rung resumes instead of training from the start.
    c.storage_path = cfg.storage_path or str(Path(trial["trial_dir"]) / "ray")
    dest = out / "final" / label
    run = run_concept(c, dest, ctx["models"], data_dir=ctx["data_dir"], clip_threshold=c.clip_threshold,
                      run_name="train", cpus_per_worker=ctx["cpus_per_worker"], log=_quiet)
    parts = objective_parts(run["metrics"], settings.kid_weight, _attacked_rate(c, run, ctx), _floor(ctx))
    attacked = "" if "attacked_rate" not in parts else f", attacked {parts['attacked_rate']:.3f}"
    say(f"[tune]     {label}: objective {parts['objective']:.3f} (ablation {parts['ablation']:.3f}, "
          f"preservation {parts['preservation']:.3f}, kid {parts['kid']:.4f}{attacked})")
    return {"trial_id": trial["trial_id"], "params": trial["params"], "delta": run["train"]["delta_path"],
            "report": str(dest / "report.md"), **parts}


def _collect(grid, space: dict[str, Param], rungs: list[int], has_default: bool) -> list[dict]:
    trials = []
    for i in range(len(grid)):
        r = grid[i]
        m = r.metrics or {}
        found = re.search(r"[0-9a-f]{5}_\d{5}", Path(r.path).name)
        row = {"trial_id": m.get("trial_id") or (found.group(0) if found else Path(r.path).name),
               "params": {n: r.config.get(n) for n in space},
               "status": "ok" if r.error is None and "objective" in m else "failed",
               "error": "" if r.error is None else _one_line(r.error),
               "steps": m.get("steps"), "stopped_early": bool(m.get("steps") is not None and m.get("steps") < rungs[-1]),
               "trial_dir": m.get("trial_dir", "")}
        row.update({k: m.get(k) for k in METRIC_COLUMNS})
        row["keeps"] = {k: v for k, v in m.items() if k.startswith("keep/")}
        row["is_default"] = False
        trials.append(row)
    trials.sort(key=lambda t: t["trial_id"])
    if trials and has_default:
        # points_to_evaluate makes the first trial the base config.
        trials[0]["is_default"] = True
    return trials


def _one_line(err) -> str:
    text = str(err).strip().splitlines()
    keep = [l for l in text if "Error" in l or "error" in l] or text
    return (keep[-1] if keep else repr(err))[:300]


def _public(t: dict | None) -> dict | None:
    if t is None:
        return None
    return {k: v for k, v in t.items() if k != "keeps"} | {"keeps": t["keeps"]}
