"""Many concepts at once: separate runs in parallel, a merged model, a joint run, one summary.

The batch YAML:

    batch:                      # optional; settings of the batch itself
      max_concurrent: 2         # concept runs in flight at once
      cpus_per_worker: null     # CPUs per Ray Train worker; null = derived (see below)
      max_failures: 0           # worker-error retries per concept run
      merge: true               # least-squares merge (+ the naive sum as a baseline)
      merge_lambda: 1.0         # weight of the preservation captions
      merge_ridge: 0.001        # ridge, relative to the data term's mean eigenvalue
      merge_prior: sum          # ridge target: sum (naive sum of deltas) | base (W0)
      evaluate_sum: true        # evaluate the naive sum too
      joint: true               # one training run over every concept's rows
      joint_overrides: {}       # AblationConfig fields of the joint run (e.g. steps)
    defaults: {...}             # AblationConfig fields every concept starts from
    concepts:
      - concept: {target: striped, anchor: plain, kind: style, neighbours: [checkered]}
        w_pres: 10.0            # any AblationConfig field, for this concept only

Each concept runs as a Ray task (`num_cpus=0`: it only orchestrates; its Ray Data actors and
Ray Train workers reserve the CPUs) that does what `ablate.ablate` does into
`<out>/concepts/<name>/`, and writes `status.json` last. A concept whose status says
`succeeded` is skipped on the next run; one that failed is tried again.

Why tasks and not Tune trials: a concept run is a whole pipeline (Ray Data generation, a Ray
Train run, Ray Data evaluation), not one trainable with a metric to search over. Tune would
wrap each in a trial function that must itself launch Ray Data and a TorchTrainer, own the
restore logic (experiment state instead of the concept's own folder) and turn a failed trial
into an experiment error we would have to unpick; a task per concept gives the same folder as
`jobs/train.py`, failure isolation by `ray.get` on its own future, resumption by that folder,
and the concurrency limit by `ray.wait`.

Resources: with `C` CPUs, `k` concepts in flight and `w` workers per concept, the workers get
`(C - 1) / (k * w) - 0.01` CPUs each (at most 1) unless `cpus_per_worker` says otherwise: one
CPU always stays free for Ray Data's tasks and 0.5-CPU actors, so a training run waiting for its
data can never hold the CPUs another concept's data pipeline needs (2 CPUs, k=2, w=1: 0.49).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .config import AblationConfig, ConfigError, concept_name, config_from_dict, save_config, to_dict
from .files import atomic, write_json, write_text

STATUS_NAME = "status.json"
VARIANTS = ("separate", "merged", "sum", "joint")


# --- the batch file -------------------------------------------------------------------------------

@dataclasses.dataclass
class BatchSettings:
    max_concurrent: int = 2
    cpus_per_worker: float | None = None
    max_failures: int = 0
    merge: bool = True
    merge_lambda: float = 1.0
    merge_ridge: float = 1e-3
    merge_prior: str = "sum"
    evaluate_sum: bool = True
    joint: bool = True
    joint_overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BatchConcept:
    index: int
    name: str
    cfg: AblationConfig
    dropped_neighbours: list[str]  # neighbours another concept of the batch ablates


@dataclasses.dataclass
class Batch:
    settings: BatchSettings
    defaults: dict
    concepts: list[BatchConcept]
    source: str = ""


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _prefixed(e: ConfigError, prefix: str) -> ConfigError:
    msg = str(e)[len(e.field) + 2:] if str(e).startswith(f"{e.field}: ") else str(e)
    return ConfigError(f"{prefix}.{e.field}" if e.field != "config" else prefix, msg)


def _settings(data: Any) -> BatchSettings:
    if data is None:
        return BatchSettings()
    if not isinstance(data, dict):
        raise ConfigError("batch", f"expected a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(BatchSettings)}
    s = BatchSettings()
    for k, v in data.items():
        path = f"batch.{k}"
        if k not in fields:
            raise ConfigError(path, f"unknown key; allowed: {', '.join(sorted(fields))}")
        if k in ("max_concurrent", "max_failures"):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "max_concurrent" else 0):
                raise ConfigError(path, f"expected an integer >= {1 if k == 'max_concurrent' else 0}, got {v!r}")
        elif k in ("merge", "evaluate_sum", "joint"):
            if not isinstance(v, bool):
                raise ConfigError(path, f"expected true or false, got {v!r}")
        elif k in ("merge_lambda", "merge_ridge", "cpus_per_worker"):
            if v is None and k == "cpus_per_worker":
                pass
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (k == "cpus_per_worker" and v == 0):
                raise ConfigError(path, f"expected a finite number {'> 0' if k == 'cpus_per_worker' else '>= 0'}, "
                                        f"got {v!r}")
            else:
                v = float(v)
        elif k == "merge_prior":
            if v not in ("sum", "base"):
                raise ConfigError(path, f"expected 'sum' or 'base', got {v!r}")
        elif k == "joint_overrides":
            if not isinstance(v, dict):
                raise ConfigError(path, f"expected a mapping of config fields, got {type(v).__name__}")
        setattr(s, k, v)
    return s


def load_batch(path: str | Path, overrides: dict[str, Any] | None = None,
               settings_overrides: dict[str, Any] | None = None) -> Batch:
    """Read and validate a batch YAML completely before anything runs.

    `overrides` (dotted AblationConfig keys, e.g. {"steps": 4}) apply to every concept after its
    own values; `settings_overrides` to the `batch:` block. Errors name the field, e.g.
    `concepts[2].concept.anchor`.
    """
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError("config", f"batch file does not exist: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError("config", f"{p} is not UTF-8 text: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError("config", f"malformed YAML in {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p} must hold a mapping at the top level, got {type(data).__name__}")
    return batch_from_dict(data, overrides, settings_overrides, source=str(p))


def batch_from_dict(data: dict, overrides: dict[str, Any] | None = None,
                    settings_overrides: dict[str, Any] | None = None, source: str = "") -> Batch:
    allowed = {"batch", "defaults", "concepts"}
    for k in data:
        if k not in allowed:
            raise ConfigError(str(k), f"unknown top-level key; allowed: {', '.join(sorted(allowed))}")
    settings = dict(data.get("batch") or {}) if isinstance(data.get("batch"), dict) else data.get("batch")
    if isinstance(settings, dict):
        settings.update({k: v for k, v in (settings_overrides or {}).items() if v is not None})
    settings = _settings(settings)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("defaults", f"expected a mapping of config fields, got {type(defaults).__name__}")
    flat = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = flat
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        config_from_dict(_deep_merge(defaults, flat))
    except ConfigError as e:
        raise _prefixed(e, "defaults") from None
    entries = data.get("concepts")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("concepts", "expected a non-empty list of concepts (each with a `concept:` mapping)")
    concepts: list[BatchConcept] = []
    for i, entry in enumerate(entries):
        where = f"concepts[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"expected a mapping, got {type(entry).__name__}")
        if not isinstance(entry.get("concept"), dict):
            raise ConfigError(f"{where}.concept", "missing: each concept needs a `concept:` mapping "
                                                  "(target, anchor, kind, neighbours, ...)")
        merged = _deep_merge(_deep_merge(defaults, entry), flat)
        try:
            cfg = config_from_dict(merged)
        except ConfigError as e:
            raise _prefixed(e, where) from None
        concepts.append(BatchConcept(i, concept_name(cfg.concept), cfg, []))
    targets: dict[str, int] = {}
    for c in concepts:
        t = c.cfg.concept.target.strip().lower()
        if t in targets:
            raise ConfigError(f"concepts[{c.index}].concept.target",
                              f"{c.cfg.concept.target!r} is already the target of concepts[{targets[t]}]")
        targets[t] = c.index
    seen: dict[str, int] = {}
    for c in concepts:
        if c.name in seen:
            raise ConfigError(f"concepts[{c.index}].concept.name", f"{c.name!r} is also concepts[{seen[c.name]}]'s "
                              "name; give one of them a distinct `name:`")
        seen[c.name] = c.index
    for c in concepts:
        spec = c.cfg.concept
        a = spec.anchor.strip().lower()
        if a in targets:
            raise ConfigError(f"concepts[{c.index}].concept.anchor",
                              f"{spec.anchor!r} is the target of concepts[{targets[a]}]: an anchor must survive "
                              "the batch")
        keep = [nb for nb in spec.neighbours if nb.strip().lower() not in targets]
        c.dropped_neighbours = [nb for nb in spec.neighbours if nb.strip().lower() in targets]
        spec.neighbours = keep
    return Batch(settings, defaults, concepts, source)


# --- one concept, as a Ray task --------------------------------------------------------------------

def models_dict(models) -> dict:
    return dataclasses.asdict(models)


def concept_done(out: Path) -> bool:
    try:
        st = json.loads((out / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return False
    return st.get("status") == "succeeded" and (out / "metrics.json").exists()


def run_concept(cfg: AblationConfig, out: str | Path, models, *, cpus_per_worker: float | None = None,
                num_actors: int = 1, max_failures: int = 0, run_name: str | None = None) -> dict:
    """One concept end to end (what `ablate.ablate` does, with the batch's CPU share per worker)."""
    import torch

    from .ablate import check_inputs, check_output_dir
    from .data import build_training_data, data_summary, read_training_data
    from .evaluate import evaluate
    from .train import run_training

    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(out).expanduser().resolve()
    check_output_dir(out)
    resolution = check_inputs(cfg, models)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    name = run_name or concept_name(cfg.concept)
    log = lambda msg: print(f"[batch:{name}] {msg}", flush=True)  # noqa: E731
    log(f"data: {cfg.num_anchor_images} anchor images + preservation rows")
    data_dir = build_training_data(cfg, models.model_path, models.clip, out / "data", models.toy,
                                   num_actors=num_actors, resolution=resolution)
    summary = data_summary(data_dir)
    log(f"training: {cfg.steps} steps, {cfg.num_workers} worker(s) x {cpus_per_worker or 'auto'} CPU")
    train = run_training(cfg, read_training_data(data_dir), models.model_path, str(out), run_name=name,
                         resume=True, max_failures=max_failures, cpus_per_worker=cpus_per_worker)
    log("evaluation")
    metrics = evaluate(cfg, models.model_path, train["delta_path"], models.clip, out, models.toy, models.probe,
                       train_history=train["metrics"], num_actors=num_actors,
                       extra={"data": summary, "restarts": train["worker_restarts"], "train_seconds": train["wall_s"]})
    metrics["wall_seconds"] = time.time() - t0
    write_json(out / "metrics.json", metrics)
    return metrics


def _concept_task_fn(cfg_dict: dict, out: str, models: dict, cpus_per_worker, num_actors: int,
                     max_failures: int) -> dict:
    """Runs in a Ray task: never raises; returns {"status", "error", "wall_s"} and writes status.json."""
    from .ablate import Models

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    outp = Path(out)
    try:
        cfg = config_from_dict(cfg_dict)
        run_concept(cfg, outp, Models(**models), cpus_per_worker=cpus_per_worker, num_actors=num_actors,
                    max_failures=max_failures)
        st = {"status": "succeeded", "error": None, "wall_s": time.time() - t0}
    except BaseException as e:  # noqa: BLE001 - a concept's failure must not take the batch down
        st = {"status": "failed", "error": f"{type(e).__name__}: {e}".strip()[:2000], "wall_s": time.time() - t0,
              "traceback": traceback.format_exc()[-6000:]}
    try:
        outp.mkdir(parents=True, exist_ok=True)
        write_json(outp / STATUS_NAME, st)
    except OSError:
        pass
    return st


def default_cpus_per_worker(total_cpus: float, max_concurrent: int, num_workers: int) -> float:
    """Leave one CPU for Ray Data; share the rest among every in-flight concept's workers."""
    per = (total_cpus - 1.0) / (max_concurrent * num_workers) - 0.01 if total_cpus > 1.0 else \
        total_cpus / (max_concurrent * num_workers + 1)
    return float(max(0.01, min(1.0, math.floor(per * 100) / 100)))


def run_separate(batch: Batch, out: Path, models, num_actors: int = 1, progress=print) -> dict[str, dict]:
    """Every concept's own run, at most `max_concurrent` at once. Returns {name: status dict}."""
    import ray

    s = batch.settings
    results: dict[str, dict] = {}
    pending = []
    for c in batch.concepts:
        d = out / "concepts" / c.name
        if concept_done(d):
            results[c.name] = dict(json.loads((d / STATUS_NAME).read_text()), skipped=True)
            progress(f"[batch] {c.name}: already finished, skipped")
        else:
            pending.append(c)
    if not pending:
        return results
    total = ray.cluster_resources().get("CPU", 1.0)
    task = ray.remote(num_cpus=0, max_retries=0)(_concept_task_fn)
    inflight: dict = {}
    t0 = time.time()
    queue = list(pending)
    while queue or inflight:
        while queue and len(inflight) < s.max_concurrent:
            c = queue.pop(0)
            cpw = s.cpus_per_worker
            if cpw is None and not c.cfg.use_gpu:
                cpw = default_cpus_per_worker(total, s.max_concurrent, c.cfg.num_workers)
            ref = task.remote(to_dict(c.cfg), str(out / "concepts" / c.name), models_dict(models), cpw, num_actors,
                              s.max_failures)
            inflight[ref] = (c, time.time())
            progress(f"[batch] {c.name}: started ({c.cfg.concept.target!r} -> {c.cfg.concept.anchor!r}, "
                     f"{c.cfg.steps} steps, {cpw} CPU/worker); in flight {len(inflight)}, queued {len(queue)}")
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            c, started = inflight.pop(ref)
            try:
                st = ray.get(ref)
            except Exception as e:  # the task's process died (OOM, killed node): still only this concept
                st = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:1500]}",
                      "wall_s": time.time() - started}
                try:
                    (out / "concepts" / c.name).mkdir(parents=True, exist_ok=True)
                    write_json(out / "concepts" / c.name / STATUS_NAME, st)
                except OSError:
                    pass
            st = dict(st, skipped=False)
            results[c.name] = st
            msg = f"[batch] {c.name}: {st['status']} in {st['wall_s']:.0f}s ({len(results)}/{len(batch.concepts)} " \
                  f"done, {time.time() - t0:.0f}s elapsed)"
            if st["status"] != "succeeded":
                msg += f" -- {st['error'].splitlines()[0] if st['error'] else ''}"
            progress(msg)
    return results


# --- captions of each concept's training data --------------------------------------------------

def _concept_words(spec, toy: bool) -> list[str]:
    from . import prompts as P

    words = [spec.target, *spec.synonyms, *spec.paraphrases]
    if toy and P.is_toy_concept(spec.target):
        words += P.toy_words(spec.target) + P.toy_words(spec.target, held_out=True)
    return [w for w in words if w.strip()]


def names_any(caption: str, word_lists: list[list[str]]) -> bool:
    text = caption.lower()
    for words in word_lists:
        for w in words:
            if re.search(rf"(?<![\w]){re.escape(w.lower())}(?![\w])", text):
                return True
    return False


def training_captions(data_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(ablation captions c*, their anchor captions c, preservation captions) of written shards."""
    import pyarrow.parquet as pq

    t = pq.read_table(str(data_dir), columns=["target_caption", "anchor_caption", "mask"]).to_pydict()
    abl = [c for c, m in zip(t["target_caption"], t["mask"]) if m]
    anc = [a for a, m in zip(t["anchor_caption"], t["mask"]) if m]
    pres = [c for c, m in zip(t["target_caption"], t["mask"]) if not m]
    return abl, anc, pres


MERGE_CAPTION_RULE = "own-concept-only"  # concept captions naming another batch concept are left out


def merge_batch(batch: Batch, out: Path, models, names: list[str], progress=print) -> dict:
    """Least-squares merge (and naive sum) of the succeeded concepts' deltas into <out>/merged/."""
    from .merge import merge_delta_files

    s = batch.settings
    mdir = out / "merged"
    info_path = mdir / "merge.json"
    settings = {"lambda": s.merge_lambda, "ridge": s.merge_ridge, "prior": s.merge_prior,
                "captions": MERGE_CAPTION_RULE}
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("concepts") == names and all(info.get(k) == v for k, v in settings.items()) \
                and (mdir / "merged_delta.safetensors").exists():
            progress("[batch] merge: already done, skipped")
            return dict(info, skipped=True)
    mdir.mkdir(parents=True, exist_ok=True)
    words = {c.name: _concept_words(c.cfg.concept, models.toy) for c in batch.concepts}
    all_words = list(words.values())
    concept_caps, preserve = [], []
    for n in names:
        abl, anc, pres = training_captions(out / "concepts" / n / "data")
        # A caption that also names another concept of the batch ("a dotted kubo") has no right answer in
        # any single delta: the dotted delta draws a plain kubo, the kubo delta a dotted square. Fitting it
        # to either fights the other concept's fit (on the toy batch: residuals 25-44 %, dotted left at 41 %
        # in the merged model). Such captions are left to the prior (the naive sum composes both edits).
        others = [w for m, w in words.items() if m != n]
        concept_caps.append(sorted({c for c in abl if not names_any(c, others)}))
        preserve += anc + [p for p in pres if not names_any(p, all_words)]
    preserve = sorted(set(preserve))
    t = time.time()
    report = merge_delta_files(models.model_path, [str(out / "concepts" / n / "matcher_delta.safetensors")
                                                   for n in names],
                               concept_caps, preserve, mdir / "merged_delta.safetensors", mdir / "sum_delta.safetensors",
                               lam=s.merge_lambda, ridge=s.merge_ridge, prior=s.merge_prior)
    report["relative_residual"] = {names[int(k)]: v for k, v in report["relative_residual"].items()}
    info = {"concepts": names, "seconds": time.time() - t, **report, "captions": MERGE_CAPTION_RULE,
            "note": "least squares on cross-attention k/v weights; any other tensor is the naive sum"}
    write_json(info_path, info)
    progress(f"[batch] merge: {len(report['least_squares'])} k/v weights by least squares over "
             f"{sum(report['num_concept_captions'])} concept + {len(preserve)} preservation captions, "
             f"{len(report['summed'])} summed; in {info['seconds']:.1f}s")
    return dict(info, skipped=False)


# --- joint run -----------------------------------------------------------------------------------

def joint_config(batch: Batch, names: list[str]) -> AblationConfig:
    by = {c.name: c for c in batch.concepts}
    base = _deep_merge(batch.defaults, {"concept": to_dict(by[names[0]].cfg)["concept"]})
    steps = sum(by[n].cfg.steps for n in names)
    data = _deep_merge(base, {"steps": steps})
    data = _deep_merge(data, batch.settings.joint_overrides)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise _prefixed(e, "batch.joint_overrides") from None


def run_joint(batch: Batch, out: Path, models, names: list[str], num_actors: int = 1, progress=print) -> dict:
    """One training run over every concept's rows with one shared matcher: <out>/joint/."""
    import ray

    from .data import build_training_data
    from .train import run_training

    jdir = out / "joint"
    jdir.mkdir(parents=True, exist_ok=True)
    st_path = jdir / STATUS_NAME
    if st_path.exists():
        st = json.loads(st_path.read_text())
        if st.get("status") == "succeeded" and st.get("concepts") == names and (jdir / "matcher_delta.safetensors").exists():
            progress("[batch] joint: already trained, skipped")
            return dict(st, skipped=True)
    t0 = time.time()
    by = {c.name: c for c in batch.concepts}
    try:
        cfg = joint_config(batch, names)
        save_config(cfg, jdir / "config.yaml")
        dirs = []
        for n in names:
            d = out / "concepts" / n / "data"
            if not (d / "_SUCCESS").exists():  # the separate run failed before its data: build it here
                from .ablate import check_inputs

                res = check_inputs(by[n].cfg, models)
                d = build_training_data(by[n].cfg, models.model_path, models.clip, jdir / "data" / n, models.toy,
                                        num_actors=num_actors, resolution=res)
            dirs.append(str(d))
        all_words = [_concept_words(c.cfg.concept, models.toy) for c in batch.concepts]
        rows_dir = jdir / "rows"
        if not (rows_dir / "_SUCCESS").exists():
            ds = None
            for d in dirs:
                part = ray.data.read_parquet(d)
                ds = part if ds is None else ds.union(part)
            # a preservation row of one concept that names another concept of the batch would keep what
            # that concept removes: such rows are dropped (the other concept's own rows cover it)
            ds = ds.filter(lambda r: bool(r["mask"]) or not names_any(str(r["target_caption"]), all_words))
            ds = ds.random_shuffle(seed=cfg.seed)
            import shutil

            tmp = rows_dir.with_name("rows.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            ds.write_parquet(str(tmp))
            (tmp / "_SUCCESS").write_text("ok\n")
            if rows_dir.exists():
                shutil.rmtree(rows_dir)
            tmp.rename(rows_dir)
        from .data import data_summary, read_training_data

        summ = data_summary(rows_dir)
        total = ray.cluster_resources().get("CPU", 1.0)
        cpw = batch.settings.cpus_per_worker
        if cpw is None and not cfg.use_gpu:
            cpw = default_cpus_per_worker(total, 1, cfg.num_workers)
        progress(f"[batch] joint: {summ['rows']} rows ({summ['ablation_rows']} ablation) from {len(names)} concepts, "
                 f"{cfg.steps} steps, {cfg.num_workers} worker(s)")
        train = run_training(cfg, read_training_data(rows_dir), models.model_path, str(jdir), run_name="joint",
                             resume=True, max_failures=batch.settings.max_failures, cpus_per_worker=cpw)
        st = {"status": "succeeded", "error": None, "concepts": names, "steps": cfg.steps, "data": summ,
              "train_seconds": train["wall_s"], "wall_s": time.time() - t0}
    except Exception as e:  # noqa: BLE001
        st = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000], "concepts": names,
              "wall_s": time.time() - t0, "traceback": traceback.format_exc()[-6000:]}
        progress(f"[batch] joint: failed -- {st['error'].splitlines()[0]}")
    write_json(st_path, st)
    return dict(st, skipped=False)


# --- evaluation of merged / joint models -------------------------------------------------------

class ImageGenerator:
    """Ray Data callable class: one pipeline (optionally with a delta), images for each row's prompt and seed."""

    def __init__(self, model_path: str, delta_path: str | None, use_gpu: bool = False):
        import torch

        from .pipeline import apply_delta, load_pipeline

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(model_path, device=self.device)
        if delta_path:
            apply_delta(self.pipe, delta_path)

    def __call__(self, batch: dict) -> dict:
        import torch

        from .images import encode_png

        n = len(batch["prompt"])
        imgs = [None] * n
        keys = sorted({(int(s), float(g)) for s, g in zip(batch["steps"], batch["guidance"])})
        for steps, guidance in keys:
            idx = [i for i in range(n) if int(batch["steps"][i]) == steps and float(batch["guidance"][i]) == guidance]
            gens = [torch.Generator(self.device).manual_seed(int(batch["seed"][i])) for i in idx]
            out = self.pipe([str(batch["prompt"][i]) for i in idx], num_inference_steps=steps,
                            guidance_scale=guidance, generator=gens, output_type="np")
            for j, im in zip(idx, np.round(out.images * 255).astype(np.uint8)):
                imgs[j] = encode_png(im)
        batch["image"] = np.array(imgs, dtype=object)
        return batch


def _eval_rows(concepts: list[BatchConcept], toy: bool) -> tuple[list[dict], dict]:
    from . import prompts as P

    rows, groups = [], {}
    for c in concepts:
        cfg = c.cfg
        gs = P.eval_groups(cfg.concept, cfg.eval_images, cfg.eval_seed, toy)
        groups[c.name] = gs
        for g in gs:
            # the seeds evaluate.generate_before_after uses: the same images as the separate runs' evaluation
            rows += [{"concept": c.name, "group": g.name, "idx": i, "prompt": p, "seed": cfg.eval_seed * 7919 + i,
                      "steps": cfg.eval_steps, "guidance": cfg.guidance_scale} for i, p in enumerate(g.prompts)]
    return rows, groups


def generate_images(rows: list[dict], model_path: str, delta_path: str | None, num_actors: int = 1,
                    use_gpu: bool = False) -> dict[tuple[str, str], np.ndarray]:
    """{(concept, group): uint8 NxHxWx3} through a Ray Data actor pool."""
    import ray

    from .images import decode_png

    res = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 0.5}
    ds = ray.data.from_items(rows).map_batches(
        ImageGenerator, fn_constructor_kwargs=dict(model_path=model_path, delta_path=delta_path, use_gpu=use_gpu),
        batch_size=32, compute=ray.data.ActorPoolStrategy(size=num_actors), **res)
    out: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for r in ds.iter_rows():
        out.setdefault((r["concept"], r["group"]), {})[int(r["idx"])] = decode_png(r["image"])
    return {k: np.stack([v[i] for i in sorted(v)]) for k, v in out.items()}


def _save_npz(path: Path, images: dict[tuple[str, str], np.ndarray]) -> None:
    with atomic(path, ".npz") as tmp:
        np.savez_compressed(tmp, **{f"{c}|{g}": v for (c, g), v in images.items()})


def _load_npz(path: Path) -> dict[tuple[str, str], np.ndarray]:
    with np.load(path) as z:
        return {tuple(k.split("|", 1)): z[k] for k in z.files}


def evaluate_variant(concepts: list[BatchConcept], models, delta_path: str, out: Path, cache: Path,
                     num_actors: int = 1, progress=print, label: str = "") -> dict[str, dict]:
    """Every concept's evaluation groups on one delta: <out>/<concept>/metrics.json + report.md + grid.png.

    Before-images come from `cache` (generated once per batch, shared by every variant).
    Skipped when every concept's metrics.json exists and names this delta, with the same contents (a
    re-merge with other settings writes a new file at the same path).
    """
    import hashlib

    from .clip import ClipScorer
    from .evaluate import group_metrics, report_markdown
    from .images import save_grid

    digest = hashlib.sha256(Path(delta_path).read_bytes()).hexdigest()
    # the judge counts too: metrics measured by another probe are not this evaluation's
    judge_digest = hashlib.sha256(Path(models.probe).read_bytes()).hexdigest() if models.probe else None
    done = {}
    for c in concepts:
        p = out / c.name / "metrics.json"
        if p.exists():
            m = json.loads(p.read_text())
            same = m.get("delta_sha256") == digest if "delta_sha256" in m else \
                Path(delta_path).stat().st_mtime <= p.stat().st_mtime  # written before this field existed
            if m.get("delta") == str(delta_path) and same and m.get("probe_sha256") == judge_digest:
                done[c.name] = m
    if len(done) == len(concepts):
        progress(f"[batch] {label} evaluation: already done, skipped")
        return done
    todo = [c for c in concepts if c.name not in done]
    t0 = time.time()
    rows, groups = _eval_rows(todo, models.toy)
    use_gpu = any(c.cfg.use_gpu for c in todo)
    cache.mkdir(parents=True, exist_ok=True)
    before: dict = {}
    missing = []
    for c in todo:
        f = cache / f"{c.name}.npz"
        if f.exists():
            before.update(_load_npz(f))
        else:
            missing.append(c)
    if missing:
        mrows = [r for r in rows if r["concept"] in {c.name for c in missing}]
        progress(f"[batch] {label} evaluation: {len(mrows)} before-images (base model, cached for every variant)")
        imgs = generate_images(mrows, models.model_path, None, num_actors, use_gpu)
        for c in missing:
            part = {k: v for k, v in imgs.items() if k[0] == c.name}
            _save_npz(cache / f"{c.name}.npz", part)
            before.update(part)
    progress(f"[batch] {label} evaluation: {len(rows)} after-images with {Path(delta_path).name}")
    after = generate_images(rows, models.model_path, str(delta_path), num_actors, use_gpu)
    scorer = ClipScorer.load(models.clip)
    judge = None
    if models.probe:
        from .toyworld.probe import ProbeJudge

        judge = ProbeJudge(models.probe)
    for c in todo:
        metrics: dict = {}
        grid_rows, labels = [], []
        for g in groups[c.name]:
            imgs = {"before": before[(c.name, g.name)], "after": after[(c.name, g.name)]}
            with_kid = g.name == "anchor" or g.name.startswith("neighbours.")
            metrics[g.name] = group_metrics(g, imgs, c.cfg, scorer, judge, models.toy, with_kid)
            for i in range(min(2, len(g.prompts))):
                grid_rows.append(np.stack([imgs["before"][i], imgs["after"][i]]))
                labels.append(f"{g.name}: {g.prompts[i]}"[:44])
        metrics["config"] = to_dict(c.cfg)
        metrics["delta"] = str(delta_path)
        metrics["delta_sha256"] = digest
        metrics["probe_sha256"] = judge_digest
        metrics["variant"] = label
        d = out / c.name
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / "report.md", report_markdown(metrics, groups[c.name]).replace(
            "# Ablation report:", f"# Ablation report ({label} model):"))
        save_grid(grid_rows, d / "grid.png", scale=3, labels=labels)
        write_json(d / "metrics.json", metrics)  # last: its presence means this concept is evaluated
        done[c.name] = metrics
    progress(f"[batch] {label} evaluation: done in {time.time() - t0:.0f}s")
    return done


# --- summary -----------------------------------------------------------------------------------

def _rate_key(m: dict) -> str:
    tgt = m.get("target", {})
    return "concept_rate" if tgt.get("concept_rate_before") is not None else "clip_accuracy"


def summarize_metrics(m: dict, key: str) -> dict:
    """Row of one concept under one variant: target before/after, anchor and neighbours kept, leakage."""
    def get(group, when):
        v = m.get(group, {}).get(f"{key}_{when}")
        return None if v is None else float(v)

    def kept(group):
        b, a = get(group, "before"), get(group, "after")
        return None if b is None or a is None or b <= 0 else a / b

    nbs = {g.split(".", 1)[1]: {"before": get(g, "before"), "after": get(g, "after"), "kept": kept(g)}
           for g in m if g.startswith("neighbours.")}
    ks = [v["kept"] for v in nbs.values() if v["kept"] is not None]
    return {"target_before": get("target", "before"), "target_after": get("target", "after"),
            "anchor_before": get("anchor", "before"), "anchor_after": get("anchor", "after"),
            "anchor_kept": kept("anchor"), "neighbours": nbs, "neighbours_kept_min": min(ks) if ks else None,
            "paraphrase_before": get("paraphrases", "before"), "paraphrase_after": get("paraphrases", "after")}


def acceptance(rows: list[dict], variant: str, max_target: float = 0.10, min_kept: float = 0.85) -> dict:
    ok = [r for r in rows if r["status"] == "succeeded"]
    vals = [r["variants"].get(variant) for r in ok]
    if not vals or any(v is None for v in vals):
        return {"checked": False, "passed": None, "why": "not every succeeded concept has this variant"}
    bad = []
    for r, v in zip(ok, vals):
        if v["target_after"] is None or v["target_after"] > max_target:
            bad.append(f"{r['name']}: target {v['target_after']}")
        for nb, x in v["neighbours"].items():
            if x["kept"] is None or x["kept"] < min_kept:
                bad.append(f"{r['name']}: neighbour {nb} kept {x['kept']}")
    return {"checked": True, "passed": not bad, "failures": bad, "max_target_rate": max_target,
            "min_neighbour_kept": min_kept, "concepts": len(ok), "failed_concepts_left_out": len(rows) - len(ok)}


def _f(v, pct=False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.0f}%" if pct else f"{v:.2f}"


def write_summary(batch: Batch, out: Path, statuses: dict[str, dict], variants: dict[str, dict[str, dict]],
                  extra: dict) -> dict:
    rows = []
    key = None
    for c in batch.concepts:
        st = statuses.get(c.name, {"status": "not run"})
        row = {"name": c.name, "target": c.cfg.concept.target, "anchor": c.cfg.concept.anchor,
               "kind": c.cfg.concept.kind, "neighbours": list(c.cfg.concept.neighbours),
               "dropped_neighbours": c.dropped_neighbours, "status": st.get("status"), "error": st.get("error"),
               "skipped": st.get("skipped", False), "wall_s": st.get("wall_s"), "variants": {}}
        for v, per in variants.items():
            m = per.get(c.name)
            if m:
                key = key or _rate_key(m)
                row["variants"][v] = summarize_metrics(m, key)
        rows.append(row)
    summary = {"batch": batch.source, "output_dir": str(out), "metric": key or "concept_rate",
               "variants": [v for v in VARIANTS if v in variants],
               "concepts": rows, **extra,
               "acceptance": {v: acceptance(rows, v) for v in VARIANTS if v in variants}}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    vs = s["variants"]
    metric = {"concept_rate": "concept rate (attribute probe)", "clip_accuracy": "CLIP accuracy"}[s["metric"]]
    lines = ["# Batch ablation summary", "", f"batch file: `{s['batch']}`; metric: {metric}.", "",
             "Variants: **separate** = each concept's own model; **merged** = one model, least-squares merge of "
             "the separate deltas' cross-attention k/v weights; **sum** = naive sum of the deltas (baseline); "
             "**joint** = one training run over all concepts' rows with one shared matcher.", "",
             "| concept | status | target before | " + " | ".join(f"target after ({v})" for v in vs) + " | "
             + " | ".join(f"neighbours kept, min ({v})" for v in vs) + " | "
             + " | ".join(f"anchor kept ({v})" for v in vs) + " | paraphrase before | "
             + " | ".join(f"paraphrase leakage ({v})" for v in vs) + " |",
             "|" + "---|" * (3 + 4 * len(vs) + 1)]
    for r in s["concepts"]:
        V = r["variants"]
        anyv = next(iter(V.values()), {})
        cells = [f"{r['name']} ({r['target']} → {r['anchor']}, {r['kind']})", r["status"] or "–",
                 _f(anyv.get("target_before"))]
        cells += [_f(V.get(v, {}).get("target_after")) for v in vs]
        cells += [_f(V.get(v, {}).get("neighbours_kept_min"), pct=True) for v in vs]
        cells += [_f(V.get(v, {}).get("anchor_kept"), pct=True) for v in vs]
        cells += [_f(anyv.get("paraphrase_before"))]
        cells += [_f(V.get(v, {}).get("paraphrase_after")) for v in vs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Neighbours (what must survive), per concept", ""]
    for r in s["concepts"]:
        line = f"- **{r['name']}**: {', '.join(r['neighbours']) or '(none)'}"
        if r["dropped_neighbours"]:
            line += (f"; left out: {', '.join(r['dropped_neighbours'])} (another concept of the batch ablates "
                     "it, so it cannot survive the merged and joint models)")
        lines.append(line)
        for v in vs:
            nb = r["variants"].get(v, {}).get("neighbours", {})
            if nb:
                lines.append(f"  - {v}: " + ", ".join(
                    f"{k} {_f(x['before'])} → {_f(x['after'])} ({_f(x['kept'], pct=True)} kept)" for k, x in nb.items()))
    failed = [r for r in s["concepts"] if r["status"] != "succeeded"]
    if failed:
        lines += ["", "## Failed concepts", ""]
        lines += [f"- **{r['name']}**: {r['status']}: {(r['error'] or '').splitlines()[0] if r['error'] else ''}"
                  for r in failed]
    lines += ["", "## Acceptance (target rate ≤ 10 %, every neighbour keeps ≥ 85 % of its before-rate)", ""]
    for v, a in s["acceptance"].items():
        if not a["checked"]:
            lines.append(f"- {v}: not checked ({a['why']})")
        else:
            lines.append(f"- {v}: {'PASS' if a['passed'] else 'MISS'} over {a['concepts']} concept(s)"
                         + (f" ({a['failed_concepts_left_out']} failed concept(s) left out)"
                            if a["failed_concepts_left_out"] else "")
                         + ("" if a["passed"] else " — " + "; ".join(a["failures"])))
    if s.get("merge"):
        m = s["merge"]
        lines += ["", "## Merge", "",
                  f"{len(m.get('least_squares', []))} cross-attention k/v weights solved by least squares "
                  f"(λ = {m.get('lambda')}, ridge {m.get('ridge')} towards the {m.get('prior')} prior); "
                  f"{len(m.get('summed', []))} other tensors summed."]
        if m.get("relative_residual"):
            lines.append("Relative residual of each concept's own edit on its captions "
                         "(‖(W*−W_i)C_i‖² / ‖(W_i−W0)C_i‖²): "
                         + ", ".join(f"{k} {_f(v)}" for k, v in m["relative_residual"].items()))
    if s.get("joint"):
        j = s["joint"]
        lines += ["", "## Joint run", "", f"status {j.get('status')}, {j.get('steps', '–')} steps"
                  + (f", data {j['data']}" if j.get("data") else "")
                  + (f"; error: {j['error'].splitlines()[0]}" if j.get("error") else "")]
    if s.get("timing"):
        lines += ["", "## Wall time", "", ", ".join(f"{k} {v:.0f}s" for k, v in s["timing"].items())]
    return "\n".join(lines) + "\n"


def console_table(s: dict) -> str:
    vs = s["variants"]
    short = {"separate": "sep", "merged": "merged", "sum": "sum", "joint": "joint"}
    head = f"{'concept':<12} {'status':<10} {'before':>6} " + " ".join(f"{short[v]:>7}" for v in vs) + "  | " + \
           " ".join(f"{'kept ' + short[v][:3]:>9}" for v in vs) + "  | " + \
           " ".join(f"{'leak ' + short[v][:3]:>9}" for v in vs)
    lines = [f"target rate after / neighbours kept (min) / paraphrase leakage  ({s['metric']})", head]
    for r in s["concepts"]:
        V = r["variants"]
        anyv = next(iter(V.values()), {})
        lines.append(f"{r['name'][:12]:<12} {(r['status'] or '–')[:10]:<10} {_f(anyv.get('target_before')):>6} "
                     + " ".join(f"{_f(V.get(v, {}).get('target_after')):>7}" for v in vs) + "  | "
                     + " ".join(f"{_f(V.get(v, {}).get('neighbours_kept_min'), pct=True):>9}" for v in vs) + "  | "
                     + " ".join(f"{_f(V.get(v, {}).get('paraphrase_after')):>9}" for v in vs))
    for v, a in s["acceptance"].items():
        if a["checked"]:
            lines.append(f"acceptance ({v}): {'PASS' if a['passed'] else 'MISS'}"
                         + ("" if a["passed"] else f" ({len(a['failures'])} misses)"))
    return "\n".join(lines)


# --- the whole batch ---------------------------------------------------------------------------

def run_batch(batch: Batch, output_dir: str | Path, models=None, num_actors: int = 1, progress=print,
              separate_only: bool = False) -> dict:
    """Separate runs (concurrent), merge, joint run, evaluations, summary. Returns summary.json's dict."""
    from .ablate import check_output_dir, init_ray, resolve_models

    t0 = time.time()
    out = Path(output_dir).expanduser().resolve()
    check_output_dir(out)
    if models is None:
        models = resolve_models(batch.concepts[0].cfg)
        for c in batch.concepts[1:]:
            m = resolve_models(c.cfg)
            if (m.model_path, m.clip) != (models.model_path, models.clip):
                raise ConfigError(f"concepts[{c.index}].model",
                                  "every concept of a batch must use the same model and CLIP (they are merged)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps({"source": batch.source, "settings": dataclasses.asdict(batch.settings),
                                                "concepts": [to_dict(c.cfg) for c in batch.concepts]}, indent=1))
    init_ray()
    timing = {}
    progress(f"[batch] {len(batch.concepts)} concepts, at most {batch.settings.max_concurrent} at once -> {out}")
    statuses = run_separate(batch, out, models, num_actors, progress)
    timing["separate"] = time.time() - t0
    ok = [c.name for c in batch.concepts if statuses.get(c.name, {}).get("status") == "succeeded"]
    variants: dict[str, dict[str, dict]] = {"separate": {}}
    for n in ok:
        variants["separate"][n] = json.loads((out / "concepts" / n / "metrics.json").read_text())
    extra: dict = {}
    oks = [c for c in batch.concepts if c.name in ok]
    cache = out / "eval" / "before"
    if not separate_only and batch.settings.merge and ok:
        t = time.time()
        try:
            info = merge_batch(batch, out, models, ok, progress)
            extra["merge"] = info
            variants["merged"] = evaluate_variant(oks, models, str(out / "merged" / "merged_delta.safetensors"),
                                                  out / "merged" / "eval", cache, num_actors, progress, "merged")
        except Exception as e:  # noqa: BLE001 - the separate results stand; say what went wrong
            extra["merge"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
            progress(f"[batch] merge: failed -- {extra['merge']['error'].splitlines()[0]}")
        timing["merge"] = time.time() - t
    if not separate_only and batch.settings.joint and ok:
        t = time.time()
        extra["joint"] = run_joint(batch, out, models, ok, num_actors, progress)
        if extra["joint"]["status"] == "succeeded":
            try:
                variants["joint"] = evaluate_variant(oks, models, str(out / "joint" / "matcher_delta.safetensors"),
                                                     out / "joint" / "eval", cache, num_actors, progress, "joint")
            except Exception as e:  # noqa: BLE001
                extra["joint"]["eval_error"] = f"{type(e).__name__}: {e}"[:2000]
        timing["joint"] = time.time() - t
    # the naive-sum baseline last: the merged and joint models come first when time is short
    if not separate_only and batch.settings.merge and batch.settings.evaluate_sum and ok \
            and extra.get("merge", {}).get("status") != "failed":
        t = time.time()
        try:
            variants["sum"] = evaluate_variant(oks, models, str(out / "merged" / "sum_delta.safetensors"),
                                               out / "merged" / "sum_eval", cache, num_actors, progress, "sum")
        except Exception as e:  # noqa: BLE001
            extra["merge"]["sum_eval_error"] = f"{type(e).__name__}: {e}"[:2000]
        timing["sum"] = time.time() - t
    timing["total"] = time.time() - t0
    extra["timing"] = timing
    summary = write_summary(batch, out, statuses, variants, extra)
    progress(console_table(summary))
    progress(f"[batch] summary: {out / 'summary.md'}, {out / 'summary.json'}")
    return summary
