"""The batch file: its settings, its concepts and their validation (nothing here runs anything).

The batch YAML:

    batch:                      # optional; settings of the batch itself
      max_concurrent: 2         # concept runs in flight at once
      cpus_per_worker: null     # CPUs per Ray Train worker; null = resources.cpu_share
      max_failures: 0           # worker-error retries per concept run
      merge: true               # least-squares merge (+ the naive sum as a baseline)
      merge_lambda: 1.0         # weight of the preservation captions
      merge_ridge: 0.001        # ridge, relative to the data term's mean eigenvalue
      merge_prior: sum          # ridge target: sum (naive sum of deltas) | base (W0)
      evaluate_sum: true        # evaluate the naive sum too
      joint: true               # one training run over every concept's rows
      joint_overrides: {}       # AblationConfig fields of the joint run (e.g. steps); it is robust if a
                                # concept is, unless this sets `robust`
      joint_compositions: 0     # per concept: ablation rows of its separate run that also name another target
      check_max_target: 0.10    # the summary's check: every target rate after <= this
      check_min_kept: 0.85      # ... and every neighbour keeps >= this fraction of its before-rate
    defaults: {...}             # AblationConfig fields every concept starts from
    concepts:
      - concept: {target: striped, anchor: plain, kind: style, neighbours: [checkered]}
        w_pres: 10.0            # any AblationConfig field, for this concept only
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

from ..config import (AblationConfig, ConfigError, apply_when_robust, concept_name, config_from_dict, nest_overrides,
                      read_yaml_mapping, to_dict)

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
    joint_compositions: int = 0
    check_max_target: float = 0.10
    check_min_kept: float = 0.85


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
    overrides: dict = dataclasses.field(default_factory=dict)  # the command line's, nested: every concept's and the joint run's


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
        if k in ("max_concurrent", "max_failures", "joint_compositions"):
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
        elif k in ("check_max_target", "check_min_kept"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(path, f"expected a rate between 0 and 1, got {v!r}")
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
    data = read_yaml_mapping(path, "config", "batch file")
    return batch_from_dict(data, overrides, settings_overrides, source=str(Path(path)))


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
    flat = nest_overrides(overrides)
    try:
        config_from_dict(_with_flags(defaults, flat))
    except ConfigError as e:
        raise _prefixed(e, "defaults") from None
    concepts = _concepts(data.get("concepts"), defaults, flat)
    targets = _check_unique(concepts)
    _drop_batch_targets(concepts, targets)
    batch = Batch(settings, defaults, concepts, source, flat)
    if settings.joint:
        joint_config(batch, [c.name for c in concepts])  # a bad joint_overrides field fails here, before anything runs
    return batch


def _with_flags(data: dict, flat: dict) -> dict:
    """A concept's fields with the command line's on top: its `when_robust` fields (if it or a flag
    turns robust on) go below the flags, as in `load_config`."""
    return _deep_merge(apply_when_robust(data, flat.get("robust")), flat)


def _concepts(entries: Any, defaults: dict, flat: dict) -> list[BatchConcept]:
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
        merged = _with_flags(_deep_merge(defaults, entry), flat)
        try:
            cfg = config_from_dict(merged)
        except ConfigError as e:
            raise _prefixed(e, where) from None
        concepts.append(BatchConcept(i, concept_name(cfg.concept), cfg, []))
    return concepts


def _check_unique(concepts: list[BatchConcept]) -> dict[str, int]:
    """Targets and names must be distinct; returns {lower-cased target: concept index}."""
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
    return targets


def _drop_batch_targets(concepts: list[BatchConcept], targets: dict[str, int]) -> None:
    """What another concept of the batch removes cannot be an anchor, nor survive as a neighbour."""
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


# robust mode's fields (`robust` and its inner attacker's, rayablate/robust.py): the joint run copies them
# from its first robust concept
ROBUST_FIELDS = tuple(f.name for f in dataclasses.fields(AblationConfig) if "robust" in f.name)


def joint_robust_source(batch: Batch, names: list[str]) -> str | None:
    """The concept whose robust settings the joint run takes: the first robust one of `names`, unless
    `joint_overrides` says whether the joint run is robust. None: the joint run is not made robust."""
    if "robust" in batch.settings.joint_overrides:
        return None
    by = {c.name: c for c in batch.concepts}
    return next((n for n in names if by[n].cfg.robust), None)


def joint_config(batch: Batch, names: list[str]) -> AblationConfig:
    """The joint run's config: the batch's defaults and command-line overrides, the first concept's
    concept block, the concepts' steps summed, then `joint_overrides`. One model holds every concept,
    so if any of them is robust the joint run is robust too, with that concept's attacker settings
    (otherwise the batch's model would be the one edit of the batch that an inversion undoes);
    `joint_overrides.robust` decides instead where it is set. A robust joint run keeps one inner
    attacker per concept (`robust_per_concept`) unless `joint_overrides` says otherwise."""
    by = {c.name: c for c in batch.concepts}
    robust_from = joint_robust_source(batch, names)
    robust = batch.settings.joint_overrides.get("robust", robust_from is not None)
    # the defaults' `when_robust` as the joint run is robust or not; the summed steps still go over it
    base = _deep_merge(apply_when_robust(batch.defaults, robust), {"concept": to_dict(by[names[0]].cfg)["concept"]})
    base = _deep_merge(base, batch.overrides)
    if robust_from is not None:
        src = to_dict(by[robust_from].cfg)
        base = _deep_merge(base, {k: src[k] for k in ROBUST_FIELDS})
    steps = sum(by[n].cfg.steps for n in names)
    data = _deep_merge(base, {"steps": steps})
    data = _deep_merge(data, batch.settings.joint_overrides)
    if "robust_per_concept" not in batch.settings.joint_overrides:
        # its rows hold every concept: one inner attacker per concept (rayablate/robust.py)
        data["robust_per_concept"] = data.get("robust") is True
    if "report_every" not in batch.settings.joint_overrides:  # about ten loss lines, however long the run
        data["report_every"] = max(20, -(-int(data["steps"]) // 10))
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise _prefixed(e, "batch.joint_overrides") from None
