"""Metrics of prompt groups: the judge's concept rate, CLIP accuracy, CLIP score and KID (CLIP features).

`measure_groups` is the one place they are computed, for a single run's evaluation, a batch's
variants and a Tune trial alike.
"""
from __future__ import annotations

import warnings

import numpy as np


def kid_clip(scorer, a: np.ndarray, b: np.ndarray) -> float:
    """Kernel Inception Distance (torchmetrics) with CLIP image features in place of Inception's."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    class ClipFeatures(torch.nn.Module):
        def forward(self, x):  # uint8 Nx3xHxW
            return scorer.encode_images(x.float() / 255.0)

    n = min(len(a), len(b))
    with warnings.catch_warnings():
        # its constructor warns, for any input, that it buffers every feature; here that is a few
        # hundred CLIP vectors at most, and the warning reached the console of every API evaluation
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer", category=UserWarning)
        kid = KernelInceptionDistance(feature=ClipFeatures(), subset_size=max(2, min(50, n)), subsets=20)
    kid.update(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(), real=True)
    kid.update(torch.from_numpy(b).permute(0, 3, 1, 2).contiguous(), real=False)
    mean, _ = kid.compute()
    return float(mean)


def ssim(images: np.ndarray, reference: np.ndarray, window: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) of each uint8 NxHxWx3 image to one uint8 HxWx3
    reference: a Gaussian window, the usual constants, averaged over channels and pixels (valid
    windows only). 1 is the same image; a different drawing of the same thing scores far lower."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).double() / 255.0
    y = torch.from_numpy(np.array(reference))[None].permute(0, 3, 1, 2).double().expand_as(x) / 255.0
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, w, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def group_metrics(group, imgs: dict[str, np.ndarray], spec, scorer, judge, world, with_kid: bool) -> dict:
    """One group's metrics for its "before" and (when present) "after" images."""
    from .prompts import anchor_texts, target_concept

    t_texts, a_texts = world.concept_texts(target_concept(spec)), anchor_texts(spec, world)
    m: dict = {"concept": group.concept, "n": len(group.prompts)}
    for when in ("before", "after"):
        if when not in imgs:
            continue
        x = imgs[when]
        rate = judge.concept_rate(x, group.concept) if judge is not None else None
        if rate is not None:  # None: the judge has no rate for this concept (a real model's neighbours)
            m[f"concept_rate_{when}"] = rate
            if group.name == "target" and hasattr(judge, "draws"):  # what the target's prompts now draw
                m[f"draws_{when}"] = judge.draws(x, group.concept)
        m[f"clip_accuracy_{when}"] = scorer.clip_accuracy(x, t_texts, a_texts)
        m[f"clip_score_{when}"] = scorer.clip_score(x, group.prompts)
    if with_kid and "after" in imgs:
        m["kid"] = kid_clip(scorer, imgs["before"], imgs["after"])
    return m


def measure_groups(groups, images: dict[str, dict[str, np.ndarray]], spec, scorer, judge, world) -> dict[str, dict]:
    """{group name: metrics}; KID (before vs after) for the anchor and neighbour groups, whose
    images should not change."""
    return {g.name: group_metrics(g, images[g.name], spec, scorer, judge, world,
                                  with_kid=g.name == "anchor" or g.name.startswith("neighbours."))
            for g in groups}
