"""Prompt worlds: where a concept's captions, evaluation prompts, CLIP texts and judge come from.

`PromptWorld` serves a real model: everything comes from the concept's prompts, prompt file and
templates, and there is no judge. `toyworld.vocab.ToyWorld` adds the bundled toy world's
vocabulary, paraphrases and attribute probe. A world is passed to the pipeline as an object
(sent to Ray tasks and actors, so it stays small and picklable). See docs/design.md.
"""
from __future__ import annotations

from . import prompts as P


class PromptWorld:
    """Concepts of a real model: prompts come from the concept's prompts / prompt_file / templates; no judge."""

    name = "prompts"
    judge_note: str | None = None  # what the judge's concept rate means, for the report

    def knows(self, concept: str) -> bool:
        return False

    def caption_pairs(self, spec, n: int, seed: int, exclude=()) -> list[tuple[str, str]]:
        """`n` (target caption c*, anchor caption c) pairs for the concept. `exclude`: concepts the
        captions should not name (a batch's other targets, for its joint run); a world that cannot
        steer its captions ignores it (the joint run re-anchors what they name: `batch.run`)."""
        return P.caption_pairs(spec, n, seed)

    def anchorize(self, caption: str, spec) -> str:
        """The caption with the concept replaced by the anchor."""
        return P.anchorize(caption, spec)

    def preservation_captions(self, spec, n: int, seed: int, exclude=()) -> list[str]:
        """Captions of other things, neighbours first: rows the CLIP mask should leave alone.
        `exclude`: as in `caption_pairs`."""
        return P.preservation_captions(spec, n)

    def eval_groups(self, spec, n: int, seed: int) -> list[P.EvalGroup]:
        """Prompt groups for evaluation: target, anchor, each neighbour, paraphrases."""
        return P.eval_groups(spec, n, seed)

    def concept_texts(self, concept: str) -> list[str]:
        """Texts that stand for a concept in CLIP accuracy: a prompt ensemble."""
        return P.concept_texts(concept)

    def named_concepts(self) -> list[str]:
        """Every concept this world can name (auto_neighbours' default candidates): none here."""
        return []

    def concept_words(self, spec) -> list[str]:
        """Words that name the target in a caption."""
        return [w for w in [spec.target, *spec.members, *spec.synonyms, *spec.paraphrases] if w.strip()]

    def mask_texts(self, spec) -> list[list[str]]:
        """The CLIP mask's concept, as groups of texts: a row's score is its similarity to the closest
        group (each member of a category is a group; any other target is one)."""
        if spec.kind == "unsafe" and spec.members:
            return [self.concept_texts(m) for m in P.target_names(spec)] + ([list(spec.synonyms)] if spec.synonyms
                                                                            else [])
        return [self.concept_texts(spec.target) + list(spec.synonyms)]

    def mask_protect(self, spec) -> tuple[list[str], list[str]] | None:
        """(words naming the concept's declared neighbours, words naming its target): the CLIP mask
        never makes a row that names a neighbour and not the target an ablation row. A CLIP that
        places entangled concepts close (world v2's blix and drub, both with a hat) otherwise scores
        "a dotted drub" above the threshold and anchorizes it to "a dotted circle", and the
        neighbour the preservation rows were meant to keep is trained away."""
        words = [w for nb in spec.neighbours for w in self.neighbour_words(nb)]
        return (words, self.concept_words(spec)) if words else None

    def neighbour_words(self, neighbour: str) -> list[str]:
        """The words that name a neighbour in a caption."""
        return [neighbour] if neighbour.strip() else []

    def mask_guard(self, spec) -> list[list[str]] | None:
        """Word groups a caption must name one word of each, or the CLIP mask leaves the row out
        (a composition's parts: "a striped circle" is not about "striped zorb"); None: no guard.
        A memorized image belongs to its captions: only they are ablation rows."""
        if spec.kind == "memorized":
            return [[spec.target, *[s for s in spec.synonyms if s.strip()]]]
        return None

    def judge(self):
        """An object with `concept_rate(uint8 NxHxWx3 images, concept) -> float`, or None."""
        return None

    def judge_sha256(self) -> str | None:
        """The judge's fingerprint: metrics measured by another judge are not comparable."""
        return None


def world_for(model: str, probe: str | None = None) -> PromptWorld:
    """The toy world of a toy bundle's SD (`model` empty, `toy:v2`, or a bundle's `sd` folder; see
    `toyworld.toy_bundle_of`), with `probe` or the bundle's own probe; a PromptWorld otherwise."""
    from .toyworld import toy_bundle_of

    found = toy_bundle_of(model)
    if found is None:
        return PromptWorld()
    from .toyworld.vocab import ToyWorld

    name, root = found
    return ToyWorld(probe or str(root / "probe" / "probe.safetensors"), world=name)
