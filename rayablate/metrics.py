"""Metrics of prompt groups: the judge's concept rate, CLIP accuracy, CLIP score and KID (CLIP features).

`measure_groups` is the one place they are computed, for a single run's evaluation, a batch's
variants and a Tune trial alike.
"""
from __future__ import annotations

import numpy as np


def kid_clip(scorer, a: np.ndarray, b: np.ndarray) -> float:
    """Kernel Inception Distance (torchmetrics) with CLIP image features in place of Inception's."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    class ClipFeatures(torch.nn.Module):
        def forward(self, x):  # uint8 Nx3xHxW
            return scorer.encode_images(x.float() / 255.0)

    n = min(len(a), len(b))
    kid = KernelInceptionDistance(feature=ClipFeatures(), subset_size=max(2, min(50, n)), subsets=20)
    kid.update(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(), real=True)
    kid.update(torch.from_numpy(b).permute(0, 3, 1, 2).contiguous(), real=False)
    mean, _ = kid.compute()
    return float(mean)


def group_metrics(group, imgs: dict[str, np.ndarray], spec, scorer, judge, world, with_kid: bool) -> dict:
    """One group's metrics for its "before" and (when present) "after" images."""
    from .prompts import anchor_texts, target_concept

    t_texts, a_texts = world.concept_texts(target_concept(spec)), anchor_texts(spec, world)
    m: dict = {"concept": group.concept, "n": len(group.prompts)}
    for when in ("before", "after"):
        if when not in imgs:
            continue
        x = imgs[when]
        if judge is not None:
            m[f"concept_rate_{when}"] = judge.concept_rate(x, group.concept)
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
