"""Ray Tune over whole single-concept ablation runs.

Each trial is an ablation run: a Ray Train `TorchTrainer` (DeepSpeed matcher + discriminator) started
from inside the Tune function, which is how Ray 2.60's Train V2 composes with Tune, followed by a
short evaluation. Trials train in rungs (by default half the steps, then all of them; a rung resumes
the previous rung's Ray Train checkpoint) and report the objective after each rung, so ASHA stops
poor trials early. The training data is built once (anchor images, CLIP similarities); each trial
re-masks it at its own CLIP threshold (`data.apply_threshold`) without generating anything again,
and the base model's "before" images are generated once and shared with every trial.

Objective (higher is better), from the single-concept evaluation's groups:

    ablation     = 1 - target concept rate after      (toy world: the attribute probe;
                                                       models without a probe: CLIP accuracy)
    preservation = mean over the anchor and neighbour groups of min(1, rate_after / rate_before)
                   (without a probe: min(1, clip_score_after / clip_score_before))
    kid          = mean over the same groups of max(0, KID(before, after)) on CLIP image features
    objective    = ablation * preservation - kid_weight * kid

Ablation and preservation multiply, so neither can be traded away for the other: removing the
concept by wrecking the model scores ~0, and keeping everything including the concept scores ~0.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from .config import AblationConfig, ConfigError, config_from_dict, save_config, to_dict
from .files import atomic, write_json, write_text

SEARCHABLE = ("clip_threshold", "margin", "lr_matcher", "lr_disc", "w_con", "w_adv", "w_reg", "w_pres")
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid", "fixed")


@dataclasses.dataclass
class Param:
    """One searched parameter: `dist` in DISTRIBUTIONS, with `low`/`high` or `values`."""

    name: str
    dist: str
    low: float | None = None
    high: float | None = None
    values: list | None = None

    def tune_domain(self):
        from ray import tune

        if self.dist == "uniform":
            return tune.uniform(self.low, self.high)
        if self.dist == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.dist == "choice":
            return tune.choice(list(self.values))
        if self.dist == "grid":
            return tune.grid_search(list(self.values))
        return self.values[0]  # fixed

    def as_dict(self) -> dict:
        if self.dist in ("uniform", "loguniform"):
            return {"dist": self.dist, "low": self.low, "high": self.high}
        if self.dist == "fixed":
            return {"dist": "fixed", "values": list(self.values)}
        return {"dist": self.dist, "values": list(self.values)}


def default_space(cfg: AblationConfig) -> dict[str, Param]:
    """Priors around the base config: log-uniform over a factor of 5 for learning rates, log-uniform
    for the loss weights, uniform +-0.1 around the CLIP threshold (a cosine similarity)."""
    t = cfg.clip_threshold
    return {
        "clip_threshold": Param("clip_threshold", "uniform", max(-1.0, t - 0.1), min(1.0, t + 0.1)),
        "margin": Param("margin", "loguniform", 1e-3, 0.1),
        "lr_matcher": Param("lr_matcher", "loguniform", cfg.lr_matcher / 5, cfg.lr_matcher * 5),
        "lr_disc": Param("lr_disc", "loguniform", cfg.lr_disc / 5, cfg.lr_disc * 5),
        "w_con": Param("w_con", "loguniform", 0.01, 1.0),
        "w_adv": Param("w_adv", "loguniform", 0.002, 0.2),
        "w_reg": Param("w_reg", "loguniform", 0.1, 3.0),
        "w_pres": Param("w_pres", "loguniform", 0.3, 10.0),
    }


def _num(name: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"space.{name}.{key}", f"must be a finite number, got {v!r}")
    return float(v)


def _check_value(name: str, v: Any, where: str) -> None:
    v = _num(name, where, v)
    if name in ("lr_matcher", "lr_disc") and v <= 0:
        raise ConfigError(f"space.{name}", f"a learning rate must be > 0, got {v}")
    if name == "clip_threshold" and not -1.0 <= v <= 1.0:
        raise ConfigError(f"space.{name}", f"a cosine-similarity threshold must lie in [-1, 1], got {v}")
    if name.startswith("w_") or name == "margin":
        if v < 0:
            raise ConfigError(f"space.{name}", f"must be >= 0, got {v}")


def parse_param(name: str, spec: Any) -> Param:
    """A YAML entry ({dist, low, high} | {dist, values} | a plain number) -> a checked Param."""
    if name not in SEARCHABLE:
        raise ConfigError(f"space.{name}", f"unknown parameter; searchable: {', '.join(SEARCHABLE)}")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        _check_value(name, spec, "value")
        return Param(name, "fixed", values=[float(spec)])
    if not isinstance(spec, dict):
        raise ConfigError(f"space.{name}", f"must be a number or a mapping with 'dist', got {type(spec).__name__}")
    unknown = set(spec) - {"dist", "low", "high", "values"}
    if unknown:
        raise ConfigError(f"space.{name}.{sorted(unknown)[0]}", "unknown key; allowed: dist, low, high, values")
    dist = spec.get("dist")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"space.{name}.dist", f"unknown distribution {dist!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if dist in ("uniform", "loguniform"):
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"space.{name}", f"{dist} needs 'low' and 'high'")
        low, high = _num(name, "low", spec["low"]), _num(name, "high", spec["high"])
        if not low < high:
            raise ConfigError(f"space.{name}", f"needs low < high, got low={low}, high={high}")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"space.{name}.low", f"loguniform needs low > 0, got {low}")
        _check_value(name, low, "low")
        _check_value(name, high, "high")
        return Param(name, dist, low, high)
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"space.{name}.values", f"{dist} needs a non-empty list of values")
    for v in values:
        _check_value(name, v, "values")
    return Param(name, dist, values=[float(v) for v in values])


def parse_flag(text: str) -> tuple[str, Param]:
    """`name=loguniform:1e-4:1e-2`, `name=uniform:0.2:0.3`, `name=choice:0,0.02`, `name=grid:1,2`, `name=0.5`."""
    if "=" not in text:
        raise ConfigError("space", f"--param needs NAME=SPEC, got {text!r}")
    name, spec = (s.strip() for s in text.split("=", 1))
    parts = spec.split(":")
    try:
        if len(parts) == 1:
            return name, parse_param(name, float(parts[0]))
        dist = parts[0]
        if dist in ("uniform", "loguniform") and len(parts) == 3:
            return name, parse_param(name, {"dist": dist, "low": float(parts[1]), "high": float(parts[2])})
        if dist in ("choice", "grid", "fixed") and len(parts) == 2:
            return name, parse_param(name, {"dist": dist, "values": [float(v) for v in parts[1].split(",")]})
    except ValueError as e:
        raise ConfigError(f"space.{name}", f"cannot read {spec!r}: {e}") from e
    raise ConfigError(f"space.{name}", f"cannot read {spec!r}; use DIST:LOW:HIGH, choice:A,B or a number")


def load_space(cfg: AblationConfig, path: str | Path | None = None, flags: list[str] | None = None,
               only: list[str] | None = None) -> dict[str, Param]:
    """The default priors, updated by a YAML file (a mapping, or one under a `space:` key) and then by
    `--param` flags. `only` keeps just those names searched (the rest stay at the base config)."""
    space = default_space(cfg)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError("space", f"file does not exist: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError("space", f"cannot read {p}: {e}") from e
        if isinstance(data, dict) and isinstance(data.get("space"), dict):
            data = data["space"]
        if not isinstance(data, dict):
            raise ConfigError("space", f"{p} must hold a mapping of parameter -> distribution")
        for name, spec in data.items():
            space[str(name)] = parse_param(str(name), spec)
    for text in flags or []:
        name, param = parse_flag(text)
        space[name] = param
    if only is not None:
        for name in only:
            if name not in SEARCHABLE:
                raise ConfigError(f"space.{name}", f"unknown parameter; searchable: {', '.join(SEARCHABLE)}")
        space = {k: v for k, v in space.items() if k in only}
    return space


def apply_params(base: AblationConfig, params: dict) -> AblationConfig:
    """The base config with the trial's values; validated (a bad combination raises ConfigError)."""
    d = to_dict(base)
    for k, v in params.items():
        if k in SEARCHABLE:
            d[k] = float(v)
    return config_from_dict(d)


# --- objective --------------------------------------------------------------------------------

def objective_parts(metrics: dict, kid_weight: float = 1.0) -> dict:
    """The documented objective and its parts, from evaluation metrics (module docstring)."""
    t = metrics["target"]
    probe = "concept_rate_after" in t
    rate = (lambda m, w: m[f"concept_rate_{w}"]) if probe else (lambda m, w: m[f"clip_accuracy_{w}"])
    ablation = 1.0 - rate(t, "after")
    keeps, kids, parts = [], [], {}
    for name, m in metrics.items():
        if not isinstance(m, dict) or not (name == "anchor" or name.startswith("neighbours.")):
            continue
        before, after = (m["concept_rate_before"], m["concept_rate_after"]) if probe else \
            (m["clip_score_before"], m["clip_score_after"])
        keep = 1.0 if before <= 0 else min(1.0, after / before)
        parts[f"keep/{name}"] = keep
        keeps.append(keep)
        if m.get("kid") is not None:
            kids.append(max(0.0, float(m["kid"])))
    preservation = sum(keeps) / len(keeps) if keeps else 1.0
    kid = sum(kids) / len(kids) if kids else 0.0
    out = {"objective": ablation * preservation - kid_weight * kid, "ablation": ablation,
           "preservation": preservation, "kid": kid, "target_rate_before": rate(t, "before"),
           "target_rate_after": rate(t, "after")}
    if "paraphrases" in metrics:
        out["paraphrase_leakage"] = rate(metrics["paraphrases"], "after")
    out.update(parts)
    return out


# --- trials -----------------------------------------------------------------------------------

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
        if self.heldout(cfg) == cfg.eval_seed:
            raise ConfigError("heldout_seed", f"must differ from the search's evaluation seed ({cfg.eval_seed})")

    def rung_steps(self, cfg: AblationConfig) -> list[int]:
        if self.rungs:
            return [int(r) for r in self.rungs]
        return [max(1, cfg.steps // 2), cfg.steps] if cfg.steps >= 2 else [cfg.steps]

    def heldout(self, cfg: AblationConfig) -> int:
        return cfg.eval_seed + 1 if self.heldout_seed is None else self.heldout_seed


def quick_evaluate(cfg: AblationConfig, model_path: str, delta_path: str, clip_name: str, probe: str | None,
                   toy: bool, groups, before: dict, seed: int) -> dict:
    """After-images of each group in this process (a trial's own CPU), measured against the shared
    before-images: the same metric names as `evaluate.evaluate`."""
    from .clip import ClipScorer
    from .evaluate import group_metrics, prompt_seed, sample_images
    from .pipeline import apply_delta, load_pipeline

    device = "cuda" if cfg.use_gpu else "cpu"
    pipe = load_pipeline(model_path, device=device)
    pipe.set_progress_bar_config(disable=True)
    apply_delta(pipe, delta_path)
    scorer = ClipScorer.load(clip_name)
    judge = None
    if probe:
        from .toyworld.probe import ProbeJudge

        judge = ProbeJudge(probe)
    metrics = {}
    for g in groups:
        after = sample_images(pipe, g.prompts, [prompt_seed(seed, i) for i in range(len(g.prompts))],
                              cfg.eval_steps, cfg.guidance_scale, device)
        with_kid = g.name == "anchor" or g.name.startswith("neighbours.")
        metrics[g.name] = group_metrics(g, {"before": before[g.name], "after": after}, cfg, scorer, judge, toy,
                                        with_kid)
    return metrics


def run_trial(params: dict, ctx: dict) -> None:
    """The Tune function: train in rungs (each resuming the last), evaluate, report the objective."""
    import torch
    from ray import tune

    from .data import read_training_data
    from .train import run_training

    torch.set_num_threads(1)
    cfg = apply_params(config_from_dict(ctx["base"]), params)
    cfg.num_workers = ctx["trial_workers"]
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(ctx["out"]) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "params.json").write_text(json.dumps(params))
    ds = read_training_data(ctx["data_dir"], cfg.clip_threshold)
    for steps in ctx["rungs"]:
        cfg.steps = steps
        train = run_training(cfg, ds, ctx["model_path"], str(trial_dir), run_name="train", resume=True,
                             cpus_per_worker=ctx["cpus_per_worker"])
        metrics = quick_evaluate(cfg, ctx["model_path"], train["delta_path"], ctx["clip"], ctx["probe"], ctx["toy"],
                                 ctx["groups"], ctx["before"], ctx["seed"])
        parts = objective_parts(metrics, ctx["kid_weight"])
        last = train["metrics"][-1] if train["metrics"] else {}
        write_json(trial_dir / "progress.json", {"steps": steps, "params": params, **parts})
        tune.report({**parts, "steps": steps, "loss": float(last.get("loss", float("nan"))),
                     "trial_dir": str(trial_dir)})


def _resources(cfg: AblationConfig, settings: TuneSettings) -> tuple[int, float]:
    """(concurrent trials, CPUs per Ray Train worker) for the cluster Ray is connected to."""
    import ray

    total_cpu = ray.cluster_resources().get("CPU", 1.0)
    if cfg.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        k = settings.max_concurrent or max(1, gpus // settings.trial_workers)
        return k, 1.0
    k = settings.max_concurrent or max(1, int(total_cpu // settings.trial_workers))
    # Leave one whole CPU for Ray Data (its file-listing task asks for one CPU; with less free, the
    # trainers' data ingest waits forever); never more than one CPU per worker.
    per = min(1.0, (total_cpu - 1.0) / (k * settings.trial_workers) - 0.01)
    return k, max(0.05, math.floor(per * 100) / 100)


# --- the search --------------------------------------------------------------------------------

def tune_ablation(cfg: AblationConfig, space: dict[str, Param], settings: TuneSettings, output_dir: str | Path,
                  user_data: str | None = None) -> dict:
    """Search `space` around `cfg`; write trials.csv, best_config.yaml, objective_vs_params.png,
    tune_report.md and tune_summary.json into `output_dir`. Returns the summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from . import prompts as P
    from .ablate import check_inputs, check_output_dir, init_ray, resolve_models
    from .config import concept_name
    from .data import build_training_data
    from .evaluate import generate_before_after

    t0 = time.time()
    settings.check(cfg)
    if not space:
        raise ConfigError("space", "nothing to search: the space is empty")
    out = Path(output_dir).expanduser().resolve()
    models = resolve_models(cfg)
    check_output_dir(out)
    resolution = check_inputs(cfg, models, user_data)
    for name, p in space.items():  # every corner of the space must make a valid config
        for v in ([p.low, p.high] if p.values is None else p.values):
            apply_params(cfg, {name: v})
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "base_config.yaml")
    write_text(out / "space.yaml", yaml.safe_dump({k: p.as_dict() for k, p in space.items()}, sort_keys=False))
    init_ray()
    k, cpus_per_worker = _resources(cfg, settings)
    rungs = settings.rung_steps(cfg)
    print(f"[tune] {settings.num_samples} trials of {concept_name(cfg.concept)!r}, {k} at a time, "
          f"{settings.trial_workers} worker(s) x {cpus_per_worker} CPU each, rungs {rungs} steps, "
          f"scheduler {settings.scheduler}", flush=True)

    print("[tune] 1/4 training data (built once; each trial re-masks it at its own CLIP threshold)", flush=True)
    data_dir = build_training_data(cfg, models.model_path, models.clip, out / "data", models.toy, user_data,
                                   resolution=resolution)
    print("[tune] 2/4 base-model images for the trials' evaluation (generated once)", flush=True)
    eval_cfg = copy.deepcopy(cfg)
    groups = P.eval_groups(cfg.concept, settings.trial_eval_images, cfg.eval_seed, models.toy)
    before = {name: imgs["before"] for name, imgs in
              generate_before_after(groups, models.model_path, None, eval_cfg, cfg.eval_seed).items()}

    ctx = {"base": to_dict(cfg), "out": str(out), "data_dir": str(data_dir), "model_path": models.model_path,
           "clip": models.clip, "probe": models.probe, "toy": models.toy, "groups": groups, "before": before,
           "seed": cfg.eval_seed, "rungs": rungs, "kid_weight": settings.kid_weight,
           "trial_workers": settings.trial_workers, "cpus_per_worker": cpus_per_worker}
    default_point = {n: getattr(cfg, n) for n, p in space.items() if p.dist not in ("grid", "fixed")}
    # The concurrency limit goes to the generator itself: Tune applies max_concurrent_trials only to
    # Searchers, and silently ignores it for a BasicVariantGenerator passed in.
    searcher = BasicVariantGenerator(points_to_evaluate=[default_point] if default_point else None,
                                     max_concurrent=k, random_state=settings.search_seed)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(rungs), grace_period=1, reduction_factor=2)
                 if settings.scheduler == "asha" and len(rungs) > 1 else FIFOScheduler())
    # The Tune function only orchestrates: its trainer's workers and data tasks reserve the CPUs.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable,
        param_space={n: p.tune_domain() for n, p in space.items()},
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=settings.num_samples,
                                    max_concurrent_trials=k, scheduler=scheduler, search_alg=searcher),
        run_config=tune.RunConfig(name="search", storage_path=str(out / "tune"), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    print("[tune] 3/4 search", flush=True)
    # Ctrl-C stops the whole job (exit 130; re-run to resume the finished trials' checkpoints), not
    # only the search: Tune's own SIGINT handler would end the search and let the job go on.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    grid = tuner.fit()
    trials = _collect(grid, space, rungs, bool(default_point))
    _write_trials_csv(out / "trials.csv", trials, space)
    ok = [t for t in trials if t["status"] == "ok"]
    if not ok:
        raise RuntimeError(f"every trial failed; first error: {trials[0]['error'] if trials else 'no trials'}")
    finished = [t for t in ok if t["steps"] == rungs[-1]] or ok
    best = max(finished, key=lambda t: t["objective"])
    default = next((t for t in trials if t["is_default"]), None)
    best_cfg = apply_params(cfg, best["params"])
    save_config(best_cfg, out / "best_config.yaml")
    plot_objective(trials, space, out / "objective_vs_params.png")
    print(f"[tune]     best trial {best['trial_id']}: objective {best['objective']:.3f} "
          f"({_fmt_params(best['params'])})", flush=True)

    summary = {"concept": concept_name(cfg.concept), "rungs": rungs, "num_trials": len(trials),
               "failed_trials": sum(t["status"] != "ok" for t in trials), "concurrent_trials": k,
               "cpus_per_worker": cpus_per_worker, "kid_weight": settings.kid_weight,
               "search_seed_eval": cfg.eval_seed, "best_search": _public(best),
               "default_search": _public(default) if default else None}
    if settings.final:
        print(f"[tune] 4/4 default vs best, trained to {rungs[-1]} steps, evaluated on held-out seed "
              f"{settings.heldout(cfg)}", flush=True)
        summary["heldout_seed"] = settings.heldout(cfg)
        summary["final"] = {}
        pairs = [("default", cfg, default), ("best", best_cfg, best)]
        for label, c, trial in pairs:
            if trial is None or trial["status"] != "ok":
                summary["final"][label] = {"error": (trial or {}).get("error", "no trial")}
                continue
            if label == "best" and default is not None and trial["trial_id"] == default["trial_id"] \
                    and "objective" in summary["final"].get("default", {}):
                # the default won: the same trial, trained and evaluated once
                summary["final"]["best"] = dict(summary["final"]["default"], same_as_default=True)
                print("[tune]     best: the default config itself (evaluated above)", flush=True)
                continue
            summary["final"][label] = _final_eval(label, c, trial, ctx, models, out, settings)
    summary["wall_seconds"] = time.time() - t0
    write_json(out / "tune_summary.json", summary)
    write_text(out / "tune_report.md", report_markdown(summary, trials, space))
    print(console_table(summary), flush=True)
    return summary


def _final_eval(label: str, cfg: AblationConfig, trial: dict, ctx: dict, models, out: Path,
                settings: TuneSettings) -> dict:
    """Finish the trial's training to the last rung (resuming its checkpoint) and evaluate it in full
    on the held-out seed."""
    from .data import read_training_data
    from .evaluate import evaluate
    from .train import run_training

    c = copy.deepcopy(cfg)
    c.num_workers = ctx["trial_workers"]
    c.steps = ctx["rungs"][-1]
    train = run_training(c, read_training_data(ctx["data_dir"], c.clip_threshold), models.model_path,
                         trial["trial_dir"], run_name="train", resume=True, cpus_per_worker=ctx["cpus_per_worker"])
    metrics = evaluate(c, models.model_path, train["delta_path"], models.clip, out / "final" / label, models.toy,
                       models.probe, train_history=train["metrics"], seed=settings.heldout(cfg))
    parts = objective_parts(metrics, settings.kid_weight)
    print(f"[tune]     {label}: objective {parts['objective']:.3f} (ablation {parts['ablation']:.3f}, "
          f"preservation {parts['preservation']:.3f}, kid {parts['kid']:.4f})", flush=True)
    return {"trial_id": trial["trial_id"], "params": trial["params"], "delta": train["delta_path"],
            "report": str(out / "final" / label / "report.md"), **parts}


def _collect(grid, space: dict[str, Param], rungs: list[int], has_default: bool) -> list[dict]:
    trials = []
    for i in range(len(grid)):
        r = grid[i]
        params = {n: r.config.get(n) for n in space}
        m = r.metrics or {}
        found = re.search(r"[0-9a-f]{5}_\d{5}", Path(r.path).name)
        row = {"trial_id": m.get("trial_id") or (found.group(0) if found else Path(r.path).name), "params": params,
               "status": "ok" if r.error is None and "objective" in m else "failed",
               "error": "" if r.error is None else _one_line(r.error),
               "steps": m.get("steps"), "stopped_early": bool(m.get("steps") is not None and m.get("steps") < rungs[-1]),
               "trial_dir": m.get("trial_dir", "")}
        for k in ("objective", "ablation", "preservation", "kid", "target_rate_after", "paraphrase_leakage", "loss"):
            row[k] = m.get(k)
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


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _write_trials_csv(path: Path, trials: list[dict], space: dict[str, Param]) -> None:
    keep_cols = sorted({k for t in trials for k in t["keeps"]})
    cols = (["trial_id", "status", "is_default", "steps", "stopped_early"] + list(space) +
            ["objective", "ablation", "preservation", "kid", "target_rate_after", "paraphrase_leakage", "loss"] +
            keep_cols + ["error"])
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for t in trials:
            row = {**t, **t["params"], **t["keeps"]}
            w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])


def plot_objective(trials: list[dict], space: dict[str, Param], path: Path) -> None:
    """One panel per searched parameter: objective of each trial; the default and the best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [n for n, p in space.items() if p.dist != "fixed"] or list(space)
    ok = [t for t in trials if t["status"] == "ok"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    best = max(ok, key=lambda t: t["objective"]) if ok else None
    for ax, n in zip(axes.flat, names):
        xs = [t["params"][n] for t in ok]
        ys = [t["objective"] for t in ok]
        early = [t["stopped_early"] for t in ok]
        ax.scatter([x for x, e in zip(xs, early) if not e], [y for y, e in zip(ys, early) if not e], c="tab:blue",
                   label="full run")
        ax.scatter([x for x, e in zip(xs, early) if e], [y for y, e in zip(ys, early) if e], c="tab:gray",
                   marker="x", label="stopped early")
        for t in ok:
            if t["is_default"]:
                ax.scatter([t["params"][n]], [t["objective"]], s=120, facecolors="none", edgecolors="green",
                           label="default")
        if best is not None:
            ax.scatter([best["params"][n]], [best["objective"]], s=160, marker="*", c="tab:red", label="best")
        if space[n].dist == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlapped
        ax.set_xlabel(n)
        ax.set_ylabel("objective")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _f(v, nd=3) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def report_markdown(summary: dict, trials: list[dict], space: dict[str, Param]) -> str:
    lines = [f"# Tune: {summary['concept']}", "",
             "objective = ablation × preservation − kid_weight × KID (see `rayablate/tune.py`); "
             f"kid_weight = {summary['kid_weight']}; rungs {summary['rungs']} steps; "
             f"{summary['num_trials']} trials, {summary['failed_trials']} failed.", ""]
    if summary.get("final"):
        lines += [f"## Default vs best, on held-out evaluation seed {summary['heldout_seed']}", "",
                  "| config | objective | ablation | preservation | KID | target rate after | paraphrase leakage |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in summary["final"].items():
            if "error" in r:
                lines.append(f"| {label} | failed: {r['error']} | | | | | |")
            else:
                label = f"{label} (= default)" if r.get("same_as_default") else label
                lines.append(f"| {label} | {_f(r['objective'])} | {_f(r['ablation'])} | {_f(r['preservation'])} | "
                             f"{_f(r['kid'], 4)} | {_f(r['target_rate_after'])} | {_f(r.get('paraphrase_leakage'))} |")
        lines.append("")
    lines += ["## Trials (search seed)", "",
              "| trial | status | steps | " + " | ".join(space) + " | objective | ablation | preservation | KID |",
              "|" + "---|" * (len(space) + 7)]
    for t in trials:
        tag = " (default)" if t["is_default"] else ""
        status = t["status"] if t["status"] == "ok" else f"failed: {t['error'][:80]}"
        lines.append(f"| {t['trial_id']}{tag} | {status} | {_f(t['steps'])} | " +
                     " | ".join(_f(t["params"][n], 4) for n in space) +
                     f" | {_f(t['objective'])} | {_f(t['ablation'])} | {_f(t['preservation'])} | {_f(t['kid'], 4)} |")
    lines += ["", "![objective vs parameters](objective_vs_params.png)", ""]
    return "\n".join(lines)


def console_table(summary: dict) -> str:
    lines = []
    if summary.get("final"):
        lines.append(f"held-out seed {summary['heldout_seed']}:  {'config':<8} {'objective':>9} {'ablation':>9} "
                     f"{'preserv.':>9} {'KID':>8} {'leakage':>8}")
        for label, r in summary["final"].items():
            if "error" in r:
                lines.append(f"{'':>22}{label:<8} failed: {r['error']}")
            else:
                lines.append(f"{'':>22}{label:<8} {_f(r['objective']):>9} {_f(r['ablation']):>9} "
                             f"{_f(r['preservation']):>9} {_f(r['kid'], 4):>8} {_f(r.get('paraphrase_leakage')):>8}")
    lines.append(f"wall time: {summary.get('wall_seconds', 0):.0f}s")
    return "\n".join(lines)
