"""Metrics of prompt groups (rayablate/metrics.py) on the tiny random toy CLIP: no Ray, no pipeline."""
from __future__ import annotations

import numpy as np


def test_kid_on_clip_features_is_near_zero_for_the_same_images_and_says_nothing(tiny_clip_path):
    """KID of a set against itself is ~0 and against other images larger; torchmetrics' buffer
    warning (raised by its constructor for any input) no longer reaches the caller."""
    import warnings

    from rayablate.clip import ClipScorer
    from rayablate.metrics import kid_clip

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    b = np.zeros_like(a) + rng.integers(0, 256, (8, 1, 1, 3), dtype=np.uint8)  # flat colours
    scorer = ClipScorer.load(str(tiny_clip_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same, other = kid_clip(scorer, a, a), kid_clip(scorer, a, b)
    assert abs(same) < 1e-3 < other, (same, other)
