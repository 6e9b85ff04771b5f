"""The toy world's quality bar: does the tiny SD draw each concept when asked, and only then?"""
from __future__ import annotations

import numpy as np

from . import world
from .probe import ProbeJudge

# The concepts of the default ablations, their anchors and their neighbours.
DEFAULT_CONCEPTS = ("striped", "plain", "dotted", "checkered", "zorb", "circle", "kubo", "square")


def generate(pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = 4.0, batch: int = 64):
    """uint8 NxHxWx3 images for `prompts`, deterministic in `seed`."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                   output_type="np")
        out.append(np.round(res.images * 255).astype(np.uint8))
    return np.concatenate(out)


def quality_table(pipe, judge: ProbeJudge, concepts=DEFAULT_CONCEPTS, n: int = 64, steps: int = 25,
                  guidance: float = 4.0, seed: int = 1234, progress=None, grid: str | None = None,
                  held_out: bool = False) -> list[dict]:
    """Per concept: the rate at which it shows in images of prompts naming it and not naming it
    (in the judge's world); with `held_out`, also when prompts use its held-out word instead (v2: its
    description, "circle with a hat"). `progress(i, concept)` is called before each concept. `grid`:
    a PNG path for the first 8 images of prompts naming each concept, one row per concept."""
    from .vocab import ToyWorld

    w = judge.world
    toy = ToyWorld(world=w.name)
    rows, shown = [], []
    for k, concept in enumerate(concepts):
        if progress:
            progress(k, concept)
        naming = [p for p, _ in w.iter_prompts_naming(concept, n, seed + 10 * k)]
        other = [p for p, _ in w.iter_prompts_not_naming(concept, n, seed + 10 * k + 5)]
        imgs_n = generate(pipe, naming, seed, steps, guidance)
        imgs_o = generate(pipe, other, seed + 1, steps, guidance)
        shown.append(imgs_n[:8])
        rows.append({
            "concept": concept,
            "rate_when_named": judge.concept_rate(imgs_n, concept),
            "rate_when_not_named": judge.concept_rate(imgs_o, concept),
            "valid_rate": judge.valid_rate(np.concatenate([imgs_n, imgs_o])),
        })
        words = toy.words(concept, held_out=True) if held_out else []
        if words:
            described = [p for p, _ in w.iter_prompts_naming(concept, n, seed + 10 * k + 7, words=words)]
            rows[-1]["held_out_word"] = words[0]
            rows[-1]["rate_when_held_out_word"] = judge.concept_rate(generate(pipe, described, seed + 2, steps,
                                                                              guidance), concept)
    if grid and shown:
        from ..images import save_grid

        save_grid(shown, grid, labels=list(concepts))
    return rows


def format_table(rows: list[dict], bar_named: float = 0.9, bar_other: float = 0.1) -> str:
    held = any("held_out_word" in r for r in rows)
    extra = " shown when called by its held-out word |" if held else ""
    lines = [f"| concept | shown when named (>= 90 %) | shown when not named (<= 10 %) |{extra} valid renders | pass |",
             "|---|---|---|---|---|" + ("---|" if held else "")]
    for r in rows:
        ok = r["rate_when_named"] >= bar_named and r["rate_when_not_named"] <= bar_other
        h = ""
        if held:
            h = f" {100 * r['rate_when_held_out_word']:.1f} % (\"{r['held_out_word']}\") |" if "held_out_word" in r else " - |"
        lines.append(f"| {r['concept']} | {100 * r['rate_when_named']:.1f} % | {100 * r['rate_when_not_named']:.1f} % "
                     f"|{h} {100 * r['valid_rate']:.1f} % | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def clip_zero_shot(scorer, images, labels, w: world.WorldDef = world.V1) -> dict[str, float]:
    """Zero-shot accuracy of a CLIP per attribute on labelled renders of world `w` (labels: Nx3
    object, colour, pattern). Each class's text embedding averages canonical captions over every
    value of the other attributes."""
    from .vocab import ToyWorld

    toy = ToyWorld(world=w.name)
    out = {}
    for k, attr in enumerate(world.ATTRIBUTES):
        classes = [toy.concept_texts(v) for v in w.values(attr)]
        pred = scorer.zero_shot(images, classes)
        out[attr] = float((pred == np.asarray(labels)[:, k]).mean())
    return out
