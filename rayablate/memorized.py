"""Memorized images (`concept.kind: memorized`): when a generation replicates the memorized image,
and the world that measures it.

A model has memorized a training image when its caption (`concept.target`) reproduces that image
(`concept.reference_image`) whatever the seed. An image *replicates* the reference when its
structural similarity to it, `metrics.ssim`, is at least `concept.replica_threshold`; the
memorization rate of a prompt group is the share of its images that replicate. SSIM in pixel space
suits the toy world's 32x32 renders; for real models the literature's descriptor is SSCD (Pizzi et al.,
"A Self-Supervised Descriptor for Image Copy Detection", CVPR 2022), a learned copy-detection
embedding compared by cosine, with which Carlini et al. and Somepalli et al. found replicas in
Stable Diffusion. SSCD's weights are not on PyPI, so it is named here, not bundled.

The ablation itself is the method's, with three changes (Kumari et al., section 3, memorized images):
the whole UNet is trained (`param_group: full` by default), the anchors are paraphrases of the
caption (`concept.anchor_prompts`), and anchor images that still replicate the reference are dropped
before training (`drop_replicas`), so the model is not taught to draw the image from another caption.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .config import ConfigError, ConceptSpec


def is_memorized(spec: ConceptSpec) -> bool:
    return spec.kind == "memorized"


def load_reference(path: str | Path, resolution: int | None = None) -> np.ndarray:
    """The reference image as uint8 HxWx3; with `resolution`, refused unless it is that size."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("concept.reference_image", f"no such file: {p}")
    try:
        with Image.open(p) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError("concept.reference_image", f"{p} is not a readable image: {e}") from e
    if resolution is not None and img.shape[:2] != (resolution, resolution):
        raise ConfigError("concept.reference_image", f"{p} is {img.shape[1]}x{img.shape[0]}; the model draws "
                                                     f"{resolution}x{resolution}: resize it to the model's resolution")
    return img


def replica_scores(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """SSIM of each uint8 NxHxWx3 image to the reference."""
    from .metrics import ssim

    return ssim(images, reference)


def drop_replicas(batch: dict, reference: np.ndarray, threshold: float) -> dict:
    """The rows of a training batch (PNG `image` column) whose image does not replicate the reference."""
    from .images import decode_png

    if not len(batch["image"]):
        return batch
    imgs = np.stack([decode_png(b) for b in batch["image"]])
    keep = replica_scores(imgs, reference) < threshold
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


class ReplicaJudge:
    """Concept rate of a group: for the memorized caption, the memorization rate; for any other
    concept, the wrapped judge's rate (None where there is none: a real model's neighbours)."""

    def __init__(self, reference: np.ndarray, threshold: float, caption: str, inner=None):
        self.reference, self.threshold, self.caption, self.inner = reference, threshold, caption, inner

    def concept_rate(self, images: np.ndarray, concept: str) -> float | None:
        if concept == self.caption:
            return float((replica_scores(images, self.reference) >= self.threshold).mean())
        return None if self.inner is None else self.inner.concept_rate(images, concept)


class MemorizedWorld:
    """A prompt world (the toy world, or a real model's) whose judge also measures memorization of
    `spec`'s reference image. Everything else is the wrapped world's. Picklable, and it carries the
    reference itself (PNG bytes), so a Ray task on another node needs no copy of the file."""

    def __init__(self, inner, spec: ConceptSpec):
        from .images import encode_png

        self.inner = inner
        self.reference_png = encode_png(load_reference(spec.reference_image))
        self.threshold, self.caption = float(spec.replica_threshold), spec.target

    def __getattr__(self, name):
        if name == "inner":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def judge_note(self) -> str:
        note = (f"target, anchor and paraphrase groups: memorization rate, the share of images whose SSIM to "
                f"the memorized image is >= {self.threshold:g}")
        return note + (f"; other groups: {self.inner.judge_note}" if self.inner.judge_note else "")

    def judge(self) -> ReplicaJudge:
        from .images import decode_png

        return ReplicaJudge(decode_png(self.reference_png), self.threshold, self.caption, self.inner.judge())

    def judge_sha256(self) -> str | None:
        h = hashlib.sha256(self.reference_png)
        h.update(str(self.threshold).encode())
        h.update((self.inner.judge_sha256() or "").encode())
        return h.hexdigest()


def replica_filter(spec: ConceptSpec) -> tuple[np.ndarray, float] | None:
    """What `data.ClipMasker(replicas=)` drops for this concept: images replicating a memorized
    image (the reference's pixels travel with the masker, not its path)."""
    return (load_reference(spec.reference_image), float(spec.replica_threshold)) if is_memorized(spec) else None


def world_for_spec(world, spec: ConceptSpec):
    """`world` itself, or for a memorized concept that world with the replica judge."""
    if not is_memorized(spec) or isinstance(world, MemorizedWorld):
        return world
    return MemorizedWorld(world, spec)
