"""The attribute probe as a judge: "is this concept in this image", the ground truth of the toy world."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..images import as_float_nchw
from .models import AttributeProbe
from .world import ATTRIBUTES, V1, WorldDef


class ProbeJudge:
    """Reads images with the attribute probe; rejects images that are not valid renders."""

    def __init__(self, path: str | Path, valid_threshold: float = 0.5, confidence: float = 0.5,
                 world: WorldDef = V1):
        self.world = world
        self.model = AttributeProbe(world=world)
        self.model.load_state_dict(load_file(str(path)))
        self.model.eval()
        self.valid_threshold = valid_threshold
        self.confidence = confidence

    @torch.no_grad()
    def probabilities(self, images) -> dict[str, torch.Tensor]:
        """Softmax probabilities per head for uint8 NxHxWx3 arrays or float Nx3xHxW tensors in [0, 1]."""
        x = as_float_nchw(images)
        out = [self.model(x[i:i + 512]) for i in range(0, len(x), 512)]
        return {k: torch.cat([o[k] for o in out]).softmax(-1) for k in self.model.heads}

    def concept_mask(self, images, concept: str, probs=None) -> np.ndarray:
        """Boolean per image: a valid render that confidently shows `concept` (every part of a
        composition such as "striped zorb"; any member of a category such as "zorb or kubo")."""
        probs = probs or self.probabilities(images)
        w = self.world
        op, parts = w.concept_parts(concept)  # a value, a composition (AND) or a category (OR)
        shows = [probs[a][:, w.values(a).index(v)] > self.confidence
                 for v, a in ((v, w.attribute_of(v)) for v in parts)]
        hit = shows[0]
        for s in shows[1:]:
            hit = (hit | s) if op == "or" else (hit & s)
        valid = probs["valid"][:, 1] > self.valid_threshold
        return (hit & valid).numpy()

    def concept_rate(self, images, concept: str, probs=None) -> float:
        return float(self.concept_mask(images, concept, probs).mean()) if len(images) else float("nan")

    def fidelity(self, images, labels, probs=None) -> float:
        """Share of images that are valid renders whose object, colour and pattern all read as `labels`
        (a list of `world.Labels`, one per image): prompts drawn as asked."""
        if not len(images):
            return float("nan")
        probs = probs or self.probabilities(images)
        ok = probs["valid"][:, 1] > self.valid_threshold
        for attr in ATTRIBUTES:
            values = self.world.values(attr)
            want = torch.tensor([values.index(getattr(lab, attr)) for lab in labels])
            ok &= probs[attr].argmax(-1) == want
        return float(ok.float().mean())

    def draws(self, images, concept: str, probs=None) -> dict[str, float]:
        """What the images show in `concept`'s attribute: the share of images read as each of its
        values (a valid render whose top value it is), and of images that are no valid render
        ("no render": a blank canvas, noise, a broken image). The shares sum to 1."""
        if not len(images):
            return {}
        probs = probs or self.probabilities(images)
        attr = self.world.attribute_of(concept)
        valid = probs["valid"][:, 1] > self.valid_threshold
        top = probs[attr].argmax(-1)
        out = {v: float(((top == i) & valid).float().mean()) for i, v in enumerate(self.world.values(attr))}
        out["no render"] = float((~valid).float().mean())
        return out

    def valid_rate(self, images, probs=None) -> float:
        probs = probs or self.probabilities(images)
        return float((probs["valid"][:, 1] > self.valid_threshold).float().mean())
