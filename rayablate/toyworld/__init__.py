"""The embedded toy world: renderer, attribute probe, tiny CLIP and tiny Stable Diffusion bundle."""
from __future__ import annotations

from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent / "weights"


def bundle_paths(root: str | Path | None = None) -> dict[str, Path]:
    """Paths of the bundled models: `sd` (diffusers folder), `clip` (open_clip folder), `probe`."""
    root = Path(root) if root else BUNDLE_DIR
    paths = {"sd": root / "sd", "clip": root / "clip", "probe": root / "probe" / "probe.safetensors"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"toy bundle incomplete, missing: {', '.join(missing)}; rebuild it with `python jobs/pretrain_toy.py`")
    return paths
