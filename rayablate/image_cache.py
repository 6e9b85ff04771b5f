"""The frozen model's images, kept on the driver's disk: a job draws them once per machine.

A job draws images of the *base* model: the anchor images of the training data and the
evaluation's before-images. None of them depends on what is being trained, so a rerun of a concept
with other training settings (learning rates, steps, loss weights, workers) draws every one of
them again. This cache keeps each one as a PNG named by what determines it:

    the model folder's content (every file: its bytes, or for files over 256 MiB their size,
    mtime and first and last MiB), the prompt, the seed, sampler steps, guidance, the device kind,
    the precision the images are drawn in, torch's and diffusers' versions and CACHE_FORMAT.

A key that differs in any of them is another file, so an edited model or another sampler setting
never reads a stale image. The images of an ablated model (a delta applied) are never cached.
Rows are served one by one: the Sampler draws only the rows the cache lacks, and a stage whose
every row is cached starts no sampler.

Where: `$RAYABLATE_IMAGE_CACHE`, else `<$RAYABLATE_CACHE or ~/.cache/rayablate>/images`;
`RAYABLATE_IMAGE_CACHE=off` (or a job's `--no-image-cache`) turns it off. Only the driver reads and
writes it (after collecting images, or from the written shards), so on a cluster it lives on the
head node and workers need no shared disk. A model given as a hub id or a remote path is not
cached. Files are written to a temporary name and renamed, so concurrent jobs never read half a PNG.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_FORMAT = "rayablate-base-images/1"
ENV = "RAYABLATE_IMAGE_CACHE"
_WHOLE_FILE_LIMIT = 256 * 2**20
_fingerprints: dict[tuple, str] = {}


def cache_root() -> Path | None:
    """The cache folder, or None when it is turned off."""
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "false", "no", "none"):
        return None
    if value:
        return Path(value).expanduser()
    from .toyworld import cache_dir

    return cache_dir() / "images"


def model_fingerprint(model_path: str | Path) -> str | None:
    """sha256 of a local model folder's files (see the module docstring); None for anything else."""
    path = Path(str(model_path)).expanduser()
    if "://" in str(model_path) or not path.is_dir():
        return None
    files = [(p, p.stat()) for p in sorted(p for p in path.rglob("*") if p.is_file())]
    stat_key = (str(path.resolve()), tuple((str(p), st.st_size, st.st_mtime_ns) for p, st in files))
    if stat_key in _fingerprints:
        return _fingerprints[stat_key]
    h = hashlib.sha256()
    for p, st in files:
        h.update(str(p.relative_to(path)).encode() + b"\0" + str(st.st_size).encode() + b"\0")
        with open(p, "rb") as f:
            if st.st_size <= _WHOLE_FILE_LIMIT:
                for chunk in iter(lambda: f.read(2**20), b""):
                    h.update(chunk)
            else:
                h.update(str(st.st_mtime_ns).encode() + f.read(2**20))
                f.seek(-2**20, os.SEEK_END)
                h.update(f.read(2**20))
    _fingerprints[stat_key] = h.hexdigest()
    return _fingerprints[stat_key]


class BaseImageCache:
    """PNG bytes of one base model's images, by (prompt, seed, steps, guidance)."""

    def __init__(self, folder: Path, salt: str):
        self.folder, self.salt = folder, salt

    @classmethod
    def for_model(cls, model_path: str | Path, use_gpu: bool = False,
                  precision: str = "fp32") -> "BaseImageCache | None":
        """The cache of this model's images drawn in `precision` (sampling.SAMPLE_PRECISIONS), or None
        (turned off, or not a local model folder)."""
        root = cache_root()
        if root is None:
            return None
        fp = model_fingerprint(model_path)
        if fp is None:
            return None
        from importlib.metadata import version  # not `import diffusers`: 2 s the driver need not spend

        from .sampling import resolve_sample_precision

        salt = json.dumps([CACHE_FORMAT, version("torch"), version("diffusers"), "cuda" if use_gpu else "cpu",
                           resolve_sample_precision(precision, use_gpu)])
        return cls(root / fp[:32], salt)

    def _file(self, prompt: str, seed: int, steps: int, guidance: float) -> Path:
        key = json.dumps([self.salt, str(prompt), int(seed), int(steps), round(float(guidance), 6)])
        return self.folder / (hashlib.sha256(key.encode()).hexdigest() + ".png")

    def get(self, prompt: str, seed: int, steps: int, guidance: float) -> bytes | None:
        f = self._file(prompt, seed, steps, guidance)
        try:
            return f.read_bytes()
        except OSError:
            return None

    def put(self, prompt: str, seed: int, steps: int, guidance: float, png: bytes) -> None:
        f = self._file(prompt, seed, steps, guidance)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp")
            tmp.write_bytes(png)
            tmp.replace(f)
        except OSError:  # a full or read-only disk costs the next job time, not this job its result
            pass

    def pngs(self, rows: list[dict], prompt_column: str, steps: int | None, guidance: float | None) -> list:
        """Each row's PNG, or None where the cache does not hold it (rows may carry "steps" and
        "guidance", as the Sampler reads them)."""
        return [self.get(r[prompt_column], r["seed"], r.get("steps", steps), r.get("guidance", guidance)) for r in rows]

    def store(self, rows: list[dict], pngs, prompt_column: str, steps: int | None, guidance: float | None) -> None:
        """Keep each row's PNG (rows the cache holds already are left as they are)."""
        for r, png in zip(rows, pngs):
            where = (r[prompt_column], r["seed"], r.get("steps", steps), r.get("guidance", guidance))
            if not self._file(*where).exists():
                self.put(*where, bytes(png))
