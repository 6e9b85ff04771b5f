"""Automatic neighbours: the concepts an ablation is most likely to damage, chosen before it runs.

An edit of the cross-attention keys and values moves every caption whose text embedding lies near
the target's, not only the target's. Declared neighbours are protected (preservation rows, the CLIP
mask's guard, an evaluation group each); an entangled concept nobody declared is not. On toy world
v2, zorb's delta (zorb is a circle with a face) left zeph (a diamond with the same face), which no
config named, in about half of its images, while the declared kubo stayed at 1.00.

`concept.auto_neighbours: k` adds the k candidates nearest the target in the model's own text
conditioning (the hidden states the UNet's cross-attention reads, over a few plain templates, as one
vector; cosine similarity) to `concept.neighbours`. The candidates are `concept.candidates`, or a toy
world's named concepts. The target, its other words, the anchor, the declared neighbours and (in a
batch) the other targets are never chosen. For zorb on world v2 the three nearest are zeph, vell
(the other face characters) and drub; for blix (a circle with a hat) drub and lorx (the other hats).

The resolved config lists the chosen concepts as ordinary neighbours with `auto_neighbours: 0`, so
the saved config.yaml reruns exactly and a resumed run chooses nothing anew.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .config import AblationConfig, ConfigError

# Plain captions each word is read in. Shared words add the same amount to every candidate's
# similarity, so they leave the ranking alone; several of them average out one template's quirks.
TEMPLATES = ("{}", "a {}", "a photo of a {}", "a red {}")


class TextSide:
    """A diffusers model's tokenizers and text encoders only: the conditioning without the UNet."""

    def __init__(self, tokenizers, encoders, xl: bool):
        from .conditioning import PromptEncoder

        self.encoders = encoders
        self.prompts = PromptEncoder.of_parts(tokenizers, xl)

    @classmethod
    def of_pipe(cls, pipe) -> "TextSide":
        from .conditioning import PromptEncoder
        from .pipeline import text_encoders

        return cls(PromptEncoder(pipe).tokenizers, [m for _, m in text_encoders(pipe)],
                   getattr(pipe.unet.config, "addition_embed_type", None) == "text_time")

    @classmethod
    def load(cls, model_path: str) -> "TextSide":
        """Only the tokenizer(s) and text encoder(s) of a diffusers folder or hub id (not the UNet)."""
        import transformers
        from diffusers import DiffusionPipeline, UNet2DConditionModel

        from .pipeline import looks_like_path, quiet_libraries

        quiet_libraries()
        if looks_like_path(model_path):
            index = json.loads((Path(model_path).expanduser() / "model_index.json").read_text())
        else:
            index = DiffusionPipeline.load_config(model_path)
        unet = UNet2DConditionModel.load_config(model_path, subfolder="unet")
        tokenizers, encoders = [], []
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            if not index.get(enc_name) or index[enc_name][0] is None:
                continue
            tokenizers.append(getattr(transformers, index[tok_name][1]).from_pretrained(model_path, subfolder=tok_name))
            enc = getattr(transformers, index[enc_name][1]).from_pretrained(model_path, subfolder=enc_name)
            encoders.append(enc.eval().requires_grad_(False))
        return cls(tokenizers, encoders, unet.get("addition_embed_type") == "text_time")

    @torch.no_grad()
    def embed(self, word: str) -> torch.Tensor:
        """One vector for `word`: its conditioning in every template, flattened and concatenated."""
        captions = [t.format(word) for t in TEMPLATES]
        dev = next(self.encoders[0].parameters()).device
        hidden, _ = self.prompts.encode(self.encoders, self.prompts.tokenize(captions, dev))
        return hidden.float().flatten().cpu()


def rank(side: TextSide, targets: list[str], candidates: list[str]) -> list[tuple[str, float]]:
    """Candidates by cosine similarity to the target (the mean over `targets`' vectors), nearest first."""
    t = torch.stack([side.embed(w) for w in targets]).mean(0)
    sims = [(c, float(torch.nn.functional.cosine_similarity(t, side.embed(c), dim=0))) for c in candidates]
    return sorted(sims, key=lambda x: -x[1])


def candidate_pool(cfg: AblationConfig, world, exclude: list[str] = ()) -> list[str]:
    """What auto_neighbours may choose from: concept.candidates or the world's named concepts, less
    the target's words, the anchor, the declared neighbours and `exclude` (a batch's other targets)."""
    spec = cfg.concept
    pool = list(spec.candidates) or list(world.named_concepts())
    if not pool:
        raise ConfigError("concept.candidates", "auto_neighbours needs concepts to choose from: list them "
                                                "(e.g. other artists' names), or use a toy world, whose named "
                                                "concepts are the candidates")
    taken = {w.strip().lower() for w in [spec.target, spec.anchor, *spec.members, *spec.synonyms,
                                          *spec.paraphrases, *spec.neighbours, *exclude] if w.strip()}
    taken |= {w.strip().lower() for w in world.concept_words(spec)}
    out = []
    for c in pool:
        if c.strip() and c.strip().lower() not in taken and c not in out:
            out.append(c)
    return out


def with_auto_neighbours(cfg: AblationConfig, world, side: TextSide | str, exclude: list[str] = ()
                         ) -> tuple[AblationConfig, list[tuple[str, float]]]:
    """(the config with its k nearest candidates added to concept.neighbours and auto_neighbours 0,
    the chosen (concept, cosine) pairs). `side`: a TextSide or the model to load one from. A config
    without auto_neighbours comes back unchanged."""
    spec = cfg.concept
    if spec.auto_neighbours <= 0:
        return cfg, []
    pool = candidate_pool(cfg, world, exclude)
    if isinstance(side, str):
        side = TextSide.load(side)
    targets = [w for w in [spec.target, *spec.members] if w.strip()] if spec.kind == "unsafe" else [spec.target]
    chosen = rank(side, targets, pool)[:spec.auto_neighbours]
    new_spec = dataclasses.replace(spec, neighbours=[*spec.neighbours, *(c for c, _ in chosen)], auto_neighbours=0)
    return dataclasses.replace(cfg, concept=new_spec), chosen


def describe(chosen: list[tuple[str, float]]) -> str:
    return ", ".join(f"{c} ({s:.2f})" for c, s in chosen)
