"""The embedded toy world: renderer, attribute probe, tiny CLIP and tiny Stable Diffusion bundle."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent / "weights"
# Each toy world's bundle (toyworld/world.py: `by_name`); v1 is the default everywhere.
BUNDLE_DIRS = {"v1": BUNDLE_DIR, "v2": Path(__file__).resolve().parent / "weights_v2"}
# The `model:` that names world v2's bundled SD (its prompts, CLIP and probe come with it).
TOY_V2 = "toy:v2"
# The `model:` that names the toy SD with a memorized image (pretrain stage `memorize`): the bundled
# SD plus the small fine-tune in weights/memorized/, made into a diffusers folder on first use.
TOY_MEMORIZED = "toy:memorized"


def bundle_paths(root: str | Path | None = None, world: str = "v1") -> dict[str, Path]:
    """Paths of a bundle's models: `sd` (diffusers folder), `clip` (open_clip folder), `probe`.
    `root` is the bundle folder; by default world `world`'s bundled one."""
    root = Path(root) if root else BUNDLE_DIRS[world]
    paths = {"sd": root / "sd", "clip": root / "clip", "probe": root / "probe" / "probe.safetensors"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        flag = "" if world == "v1" else f" --world {world}"
        raise FileNotFoundError(
            f"toy bundle incomplete, missing: {', '.join(missing)}; rebuild it with `python jobs/pretrain_toy.py{flag}`")
    return paths


def bundle_world(root: str | Path) -> str:
    """The name of the toy world a bundle folder (or its `sd` folder) was pretrained on."""
    import json

    root = Path(root).expanduser().resolve()
    for d in (root, root.parent):
        if (d / "world.json").exists():
            return json.loads((d / "world.json").read_text())["world"]
    return "v1"  # bundles made before world v2 carry no world.json


def toy_bundle_of(model: str) -> tuple[str, Path] | None:
    """(world name, bundle folder) when `model` names a toy bundle's SD: empty (v1, the default),
    `toy:v2`, `toy:memorized` (v1's), or the path of a bundle's `sd` folder (its world.json says
    which world; the bundled v1 folder has none). None for any other model."""
    if not model or model == TOY_MEMORIZED:
        return "v1", BUNDLE_DIR
    if model == TOY_V2:
        return "v2", BUNDLE_DIRS["v2"]
    if model.startswith("toy:"):
        raise ValueError(f"unknown toy model {model!r}; known: {TOY_V2}, {TOY_MEMORIZED}")
    try:
        sd = Path(model).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    root = sd.parent
    if sd.name == "sd" and (root / "world.json").exists():
        return bundle_world(root), root
    if sd == (BUNDLE_DIR / "sd").resolve():
        return "v1", BUNDLE_DIR
    return None


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
