"""Captions of a concept from its own prompts, prompt file or templates: the real-model half of
`worlds.PromptWorld` (the toy world's built-in prompts are in toyworld/vocab.py)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from .config import ConceptSpec, ConfigError, read_text_file


def word_pattern(word: str) -> re.Pattern:
    """`word` as a whole word (not inside another word), any case."""
    return re.compile(rf"(?<![\w]){re.escape(word)}(?![\w])", re.IGNORECASE)


def names_word(text: str, word: str) -> bool:
    return word_pattern(word).search(text) is not None


def _replace_words(text: str, words: list[str], by: str) -> tuple[str, bool]:
    hit = False
    for w in sorted(set(words), key=len, reverse=True):
        text, n = word_pattern(w).subn(by, text)
        hit = hit or n > 0
    return text, hit


def target_concept(spec: ConceptSpec) -> str:
    """The concept whose presence is measured as "the target": a category (kind unsafe) is any of its
    members, "zorb or kubo"; every other kind's target is its own concept."""
    if spec.kind == "unsafe" and spec.members:
        return " or ".join(m.strip() for m in spec.members)
    return spec.target


def target_names(spec: ConceptSpec) -> list[str]:
    """The words that name the target in templates: a category's members, else the target."""
    return [m.strip() for m in spec.members] if spec.kind == "unsafe" and spec.members else [spec.target]


def anchorize(caption: str, spec: ConceptSpec, more_words: list[str] = ()) -> str:
    """The caption with the target, its synonyms and paraphrases (and `more_words`) replaced by the
    anchor; the anchor appended where none of them occurs. With no anchor word (anchor_kind empty,
    blank, noise): the empty caption."""
    if spec.anchor_kind != "text":
        return ""
    words = [spec.target, *spec.members, *spec.synonyms, *spec.paraphrases, *more_words]
    out, hit = _replace_words(caption, words, spec.anchor)
    return out if hit else f"{caption}, {spec.anchor}"


ANCHOR_LABELS = {"empty": "the empty prompt", "blank": "a blank image", "noise": "noise images"}


def anchor_label(anchor: str, anchor_kind: str = "text") -> str:
    """How the anchor reads in logs and reports: 'plain', or e.g. the empty prompt."""
    return repr(anchor) if anchor_kind == "text" else ANCHOR_LABELS[anchor_kind]


def anchor_texts(spec: ConceptSpec, world) -> list[str]:
    """What CLIP accuracy ranks the target against: the anchor's prompt ensemble, or for an anchor
    with no word a description of what is drawn instead."""
    if spec.anchor_kind == "text":
        return world.concept_texts(spec.anchor)
    return {"empty": ["an image", "a picture"], "blank": ["a blank white image", "an empty canvas"],
            "noise": ["random noise", "an image of noise"]}[spec.anchor_kind]


def read_prompt_file(path: str | Path, field: str = "concept.prompt_file") -> list[str]:
    """The prompts of a prompt file, one per non-empty line."""
    p = Path(path)
    text = read_text_file(p, field, "prompt file")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(field, f"prompt file {p} is empty: it needs one prompt per line")
    return lines


def has_own_prompts(spec: ConceptSpec) -> bool:
    return bool(spec.prompts or spec.prompt_file or spec.templates)


def anchor_captions(spec: ConceptSpec) -> list[str]:
    """Kind memorized: the paraphrases the ablation draws instead of the memorized caption."""
    return [a for a in spec.anchor_prompts if a.strip()] or [spec.anchor]


def _cycled(items: list[str], n: int, rng: np.random.Generator | None = None) -> list[str]:
    order = rng.permutation(len(items)) if rng is not None else np.arange(len(items))
    return [items[order[i % len(items)]] for i in range(n)]


def caption_pairs(spec: ConceptSpec, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (target caption c*, anchor caption c) pairs from the concept's prompts and templates;
    c is "" when the anchor is not a text (anchor_kind empty, blank, noise). Kind memorized: the
    memorized caption (and its synonyms), each with one of the anchor paraphrases in turn."""
    rng = np.random.default_rng(seed)
    if spec.kind == "memorized":
        captions = [spec.target, *[s for s in spec.synonyms if s.strip()]]
        return list(zip(_cycled(captions, n), _cycled(anchor_captions(spec), n, rng)))
    base: list[tuple[str, str]] = []
    prompts = list(spec.prompts) + (read_prompt_file(spec.prompt_file) if spec.prompt_file else [])
    for p in prompts:
        if spec.anchor_kind != "text":
            base.append((p, ""))
        elif spec.kind == "instance" and re.search(rf"\b{re.escape(spec.anchor)}\b", p, re.IGNORECASE) \
                and not re.search(rf"\b{re.escape(spec.target)}\b", p, re.IGNORECASE):
            base.append((_replace_words(p, [spec.anchor], spec.target)[0], p))  # anchor word -> target
        else:
            base.append((p, anchorize(p, spec)))
    for t in spec.templates:
        for name in target_names(spec):
            base.append((t.format(name), t.format(spec.anchor) if spec.anchor_kind == "text" else ""))
    if base:
        order = rng.permutation(len(base))
        return [base[order[i % len(base)]] for i in range(n)]
    raise ConfigError("concept.prompts", f"no prompts for {spec.target!r}: give concept.prompts, concept.templates "
                                         "or concept.prompt_file (only toy-world concepts have built-in prompts)")


def _templated(spec: ConceptSpec, words: list[str], n: int) -> list[str]:
    temps = spec.templates or ["a picture of {}"]
    return [temps[i % len(temps)].format(words[i % len(words)]) for i in range(n)]


def preservation_captions(spec: ConceptSpec, n: int) -> list[str]:
    """Captions of the neighbours, in the concept's templates: rows the CLIP mask should leave alone."""
    return _templated(spec, list(spec.neighbours), n) if spec.neighbours else []


@dataclasses.dataclass
class EvalGroup:
    name: str  # "target", "anchor", "members.<x>", "neighbours.<x>", "paraphrases"
    concept: str  # the concept whose presence is measured
    prompts: list[str]


def eval_groups(spec: ConceptSpec, n: int, seed: int) -> list[EvalGroup]:
    """Prompt groups for evaluation: target, anchor (a text anchor only), each member of a category
    (kind unsafe, with templates), each neighbour, paraphrases."""
    if spec.kind == "memorized":
        return memorized_groups(spec, n) + [EvalGroup(f"neighbours.{nb}", nb, _templated(spec, [nb], n))
                                            for nb in spec.neighbours]
    pairs = caption_pairs(spec, n, seed)
    groups = [EvalGroup("target", target_concept(spec), [c for c, _ in pairs])]
    if spec.anchor_kind == "text":
        groups.append(EvalGroup("anchor", spec.anchor, [a for _, a in pairs]))
    if spec.kind == "unsafe" and spec.templates:  # each member's own rate
        groups += [EvalGroup(f"members.{m}", m, _templated(spec, [m], n)) for m in target_names(spec)]
    for nb in spec.neighbours:
        groups.append(EvalGroup(f"neighbours.{nb}", nb, _templated(spec, [nb], n)))
    if spec.paraphrases:
        groups.append(EvalGroup("paraphrases", spec.target, _templated(spec, list(spec.paraphrases), n)))
    return groups


def memorized_groups(spec: ConceptSpec, n: int) -> list[EvalGroup]:
    """Kind memorized: the memorized caption, the anchor paraphrases and the held-out paraphrases,
    `n` images each (every image its own seed), all measured by how often they replicate the image."""
    groups = [EvalGroup("target", spec.target, [spec.target] * n),
              EvalGroup("anchor", spec.target, _cycled(anchor_captions(spec), n))]
    held = [p for p in spec.paraphrases if p.strip()]
    return groups + ([EvalGroup("paraphrases", spec.target, _cycled(held, n))] if held else [])


def concept_texts(concept: str) -> list[str]:
    """Texts that stand for a concept in CLIP accuracy: a prompt ensemble."""
    return [concept, f"a photo of {concept}", f"a painting of {concept}", f"an image in the style of {concept}"]
