"""The embedded toy world: renderer, attribute probe, tiny CLIP and tiny Stable Diffusion bundle."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent / "weights"
# The `model:` that names the toy SD with a memorized image (pretrain stage `memorize`): the bundled
# SD plus the small fine-tune in weights/memorized/, made into a diffusers folder on first use.
TOY_MEMORIZED = "toy:memorized"


def bundle_paths(root: str | Path | None = None) -> dict[str, Path]:
    """Paths of the bundled models: `sd` (diffusers folder), `clip` (open_clip folder), `probe`."""
    root = Path(root) if root else BUNDLE_DIR
    paths = {"sd": root / "sd", "clip": root / "clip", "probe": root / "probe" / "probe.safetensors"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"toy bundle incomplete, missing: {', '.join(missing)}; rebuild it with `python jobs/pretrain_toy.py`")
    return paths


def memorized_paths(root: str | Path | None = None) -> dict[str, Path]:
    """The memorized image's files: `delta` (the memorizing fine-tune), `reference` (the image, PNG),
    `info` (what the stage measured)."""
    d = (Path(root) if root else BUNDLE_DIR) / "memorized"
    paths = {"delta": d / "delta.safetensors", "reference": d / "reference.png", "info": d / "memorized.json"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"toy memorized image missing: {', '.join(missing)}; make it with "
                                f"`python jobs/pretrain_toy.py --memorize`")
    return paths


def cache_dir() -> Path:
    """Where derived models are kept: $RAYABLATE_CACHE, else ~/.cache/rayablate."""
    return Path(os.environ.get("RAYABLATE_CACHE") or Path.home() / ".cache" / "rayablate").expanduser()


def memorized_model(root: str | Path | None = None) -> Path:
    """A diffusers folder of the toy SD that has memorized the image: the bundle's SD with the
    memorizing delta applied, written once per delta (keyed by its hash) under `cache_dir()`."""
    import shutil

    from ..pipeline import apply_delta, load_pipeline, save_pipeline

    delta = memorized_paths(root)["delta"]
    out = cache_dir() / f"toy-memorized-{hashlib.sha256(delta.read_bytes()).hexdigest()[:12]}"
    if (out / "model_index.json").exists():
        return out
    pipe = load_pipeline(bundle_paths(root)["sd"])
    apply_delta(pipe, delta)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(pipe, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
