"""The search space: which config fields can be searched, their priors, and how a YAML file or a
`--param` flag names a distribution. Every problem raises ConfigError naming `space.<parameter>`."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..config import AblationConfig, ConfigError, config_from_dict, read_yaml_mapping, to_dict

SEARCHABLE = ("clip_threshold", "margin", "lr_matcher", "lr_disc", "w_con", "w_adv", "w_reg", "w_pres",
              "w_robust", "robust_lr")  # the last two only matter with robust: true
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
        return {"dist": self.dist, "values": list(self.values)}

    def corners(self) -> list[float]:
        return [self.low, self.high] if self.values is None else list(self.values)


def default_space(cfg: AblationConfig) -> dict[str, Param]:
    """Priors around the base config: log-uniform over a factor of 5 for learning rates, log-uniform
    for the loss weights, uniform +-0.1 around the CLIP threshold (a cosine similarity)."""
    t = cfg.clip_threshold
    robust = {"w_robust": Param("w_robust", "loguniform", 0.3, 10.0),
              "robust_lr": Param("robust_lr", "loguniform", 3e-3, 3e-2)} if cfg.robust else {}
    return {**robust,
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
    if name in ("lr_matcher", "lr_disc", "robust_lr") and v <= 0:
        raise ConfigError(f"space.{name}", f"a learning rate must be > 0, got {v}")
    if name == "clip_threshold" and not -1.0 <= v <= 1.0:
        raise ConfigError(f"space.{name}", f"a cosine-similarity threshold must lie in [-1, 1], got {v}")
    if name.startswith("w_") or name == "margin":
        if v < 0:
            raise ConfigError(f"space.{name}", f"must be >= 0, got {v}")


def _check_name(name: str) -> None:
    if name not in SEARCHABLE:
        raise ConfigError(f"space.{name}", f"unknown parameter; searchable: {', '.join(SEARCHABLE)}")


def parse_param(name: str, spec: Any) -> Param:
    """A YAML entry ({dist, low, high} | {dist, values} | a plain number) -> a checked Param."""
    _check_name(name)
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
        data = read_yaml_mapping(path, field="space")
        if isinstance(data.get("space"), dict):
            data = data["space"]
        for name, spec in data.items():
            space[str(name)] = parse_param(str(name), spec)
    for text in flags or []:
        name, param = parse_flag(text)
        space[name] = param
    if only is not None:
        for name in only:
            _check_name(name)
        space = {k: v for k, v in space.items() if k in only}
    return space


def apply_params(base: AblationConfig, params: dict) -> AblationConfig:
    """The base config with the trial's values; validated (a bad combination raises ConfigError)."""
    d = to_dict(base)
    for k, v in params.items():
        if k in SEARCHABLE:
            d[k] = float(v)
    return config_from_dict(d)


def check_space(cfg: AblationConfig, space: dict[str, Param]) -> None:
    """Refuse an empty space, and one whose corners make an invalid config, before any trial starts."""
    if not space:
        raise ConfigError("space", "nothing to search: the space is empty")
    for name, p in space.items():
        for v in p.corners():
            apply_params(cfg, {name: v})
