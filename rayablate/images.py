"""Image conversions shared by every module: array layouts, PNG bytes, grids."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


def as_float_nchw(images) -> torch.Tensor:
    """uint8 NxHxWx3 arrays (or float NxHxWx3 / Nx3xHxW) as a float Nx3xHxW tensor in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2).contiguous()
    arr = np.asarray(images)
    x = torch.from_numpy(arr).float()
    if arr.dtype == np.uint8:
        x = x / 255.0
    return x.permute(0, 3, 1, 2).contiguous() if x.shape[-1] == 3 else x


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 HxWx3 from encoded image bytes (PNG, JPEG, ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise ImageDecodeError(f"undecodable image bytes ({len(data) if data else 0} bytes): {e}") from e


def save_grid(rows: Sequence[np.ndarray], path: str | Path, scale: int = 3, labels: Sequence[str] | None = None) -> Path:
    """Save rows of uint8 NxHxWx3 images as one PNG (row i = rows[i]), nearest-upscaled by `scale`."""
    from PIL import Image, ImageDraw

    h, w = rows[0].shape[1:3]
    ncol = max(len(r) for r in rows)
    label_w = 0 if not labels else 8 * max(len(s) for s in labels) + 8
    canvas = np.full((len(rows) * h * scale, label_w + ncol * w * scale, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            up = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))
            canvas[i * h * scale:(i + 1) * h * scale, label_w + j * w * scale:label_w + (j + 1) * w * scale] = up
    im = Image.fromarray(canvas)
    if labels:
        d = ImageDraw.Draw(im)
        for i, s in enumerate(labels):
            d.text((4, i * h * scale + h * scale // 2 - 5), s, fill=(0, 0, 0))
    from .files import atomic

    with atomic(path, ".png") as tmp:
        im.save(tmp)
    return Path(path)
