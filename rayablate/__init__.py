"""rayablate: remove concepts from Stable Diffusion models, in-process or distributed on Ray.

The in-process API (no Ray; see `rayablate.api` and the README):

    delta = rayablate.ablate(pipe, rayablate.Concept(target="striped", anchor="plain"), steps=100)
    delta.save("striped.safetensors"); delta.apply(pipe)
    report = rayablate.evaluate(pipe_before, pipe, concept)

The Ray jobs (`jobs/train.py`, `jobs/batch_ablate.py`, `jobs/tune.py`) run the same core
(`rayablate.method`) on Ray Data, Ray Train + DeepSpeed and Ray Tune.
"""

__version__ = "0.1.0"

import os as _os  # noqa: E402

from .resources import TUNE_GC_ENV as _TUNE_GC_ENV, tune_gc as _tune_gc  # noqa: E402 (stdlib only)

if _os.environ.get(_TUNE_GC_ENV) == "1":  # a worker of a local Ray that a job started (job.init_ray)
    _tune_gc()

from .api import Concept, Delta, Report, ablate, evaluate  # noqa: E402
from .config import AblationConfig, ConfigError  # noqa: E402

# torch and diffusers load on first use: every Ray worker imports this package to reach the module it
# needs (Ray Train's controller unpickles a config), and torch alone is a second of CPU.
_LAZY = {"apply_delta": "pipeline", "load_pipeline": "pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AblationConfig", "Concept", "ConfigError", "Delta", "Report", "ablate", "apply_delta", "evaluate",
           "load_pipeline", "__version__"]
