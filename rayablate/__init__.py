"""rayablate: remove concepts from Stable Diffusion models, in-process or distributed on Ray.

The in-process API (no Ray; see `rayablate.api` and the README):

    delta = rayablate.ablate(pipe, rayablate.Concept(target="striped", anchor="plain"), steps=100)
    delta.save("striped.safetensors"); delta.apply(pipe)
    report = rayablate.evaluate(pipe_before, pipe, concept)

The Ray jobs (`jobs/train.py`, `jobs/batch_ablate.py`, `jobs/tune.py`) run the same core
(`rayablate.method`) on Ray Data, Ray Train + DeepSpeed and Ray Tune.
"""

__version__ = "0.1.0"

from .api import Concept, Delta, Report, ablate, evaluate  # noqa: E402
from .config import AblationConfig, ConfigError  # noqa: E402
from .pipeline import apply_delta, load_pipeline  # noqa: E402

__all__ = ["AblationConfig", "Concept", "ConfigError", "Delta", "Report", "ablate", "apply_delta", "evaluate",
           "load_pipeline", "__version__"]
