"""Caption pairs: target captions c* and anchor captions c, preservation captions, evaluation prompts."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from .config import ConceptSpec, ConfigError
from .toyworld import world


def is_toy_concept(word: str) -> bool:
    try:
        world.attribute_of(word)
        return True
    except KeyError:
        return False


def toy_words(concept: str, held_out: bool = False) -> list[str]:
    """The toy world's words for a concept value: training words, or the held-out paraphrases."""
    table = {"object": world.OBJECT_WORDS, "colour": world.COLOUR_WORDS, "pattern": world.PATTERN_WORDS}[
        world.attribute_of(concept)]
    return (world.held_out_words if held_out else world.train_words)(table)[concept]


def _replace_words(text: str, words: list[str], by: str) -> tuple[str, bool]:
    hit = False
    for w in sorted(set(words), key=len, reverse=True):
        pattern = re.compile(rf"(?<![\w]){re.escape(w)}(?![\w])", re.IGNORECASE)
        text, n = pattern.subn(by, text)
        hit = hit or n > 0
    return text, hit


def anchorize(caption: str, spec: ConceptSpec, toy: bool) -> str:
    """The caption with the concept replaced by the anchor.

    In the toy world every word of the target's attribute is replaced (a row the CLIP mask flags as
    being about "striped" has its pattern slot set to the anchor, whatever pattern it names); for
    other models the target, its synonyms and paraphrases are.
    """
    words = [spec.target, *spec.synonyms, *spec.paraphrases]
    if toy and is_toy_concept(spec.target):
        attr = world.attribute_of(spec.target)
        table = {"object": world.OBJECT_WORDS, "colour": world.COLOUR_WORDS, "pattern": world.PATTERN_WORDS}[attr]
        words += [w for ws in table.values() for w in ws]
    out, hit = _replace_words(caption, words, spec.anchor)
    return out if hit else f"{caption}, {spec.anchor}"


def read_prompt_file(path: str | Path, field: str = "concept.prompt_file") -> list[str]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(field, f"prompt file does not exist: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(field, f"prompt file {p} is not UTF-8 text: {e}") from e
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(field, f"prompt file {p} is empty: it needs one prompt per line")
    return lines


def caption_pairs(spec: ConceptSpec, n: int, seed: int, toy: bool) -> list[tuple[str, str]]:
    """`n` (target caption c*, anchor caption c) pairs for the concept."""
    rng = np.random.default_rng(seed)
    base: list[tuple[str, str]] = []
    prompts = list(spec.prompts) + (read_prompt_file(spec.prompt_file) if spec.prompt_file else [])
    for p in prompts:
        if spec.kind == "instance" and re.search(rf"\b{re.escape(spec.anchor)}\b", p, re.IGNORECASE) \
                and not re.search(rf"\b{re.escape(spec.target)}\b", p, re.IGNORECASE):
            base.append((_replace_words(p, [spec.anchor], spec.target)[0], p))  # anchor word -> target
        else:
            base.append((p, anchorize(p, spec, toy=False)))
    for t in spec.templates:
        base.append((t.format(spec.target), t.format(spec.anchor)))
    if base:
        order = rng.permutation(len(base))
        return [base[order[i % len(base)]] for i in range(n)]
    if toy and is_toy_concept(spec.target) and is_toy_concept(spec.anchor):
        return _toy_pairs(spec, n, seed)
    raise ConfigError("concept.prompts", f"no prompts for {spec.target!r}: give concept.prompts, concept.templates "
                                         "or concept.prompt_file (only toy-world concepts have built-in prompts)")


def _toy_pairs(spec: ConceptSpec, n: int, seed: int) -> list[tuple[str, str]]:
    words = [w for w in [*toy_words(spec.target), *spec.synonyms] if w]
    anchor_word = toy_words(spec.anchor)[0]
    pairs = []
    for prompt, _ in world.iter_prompts_naming(spec.target, n, seed, words=words):
        pairs.append((prompt, anchorize(prompt, dataclasses.replace(spec, anchor=anchor_word), toy=True)))
    return pairs


def preservation_captions(spec: ConceptSpec, n: int, seed: int, toy: bool) -> list[str]:
    """Captions of other things, neighbours first: rows the CLIP mask should leave alone."""
    if toy and is_toy_concept(spec.target):
        out = []
        for k, nb in enumerate(spec.neighbours):
            if is_toy_concept(nb):
                out += [p for p, _ in world.iter_prompts_naming(nb, max(1, n // (2 * max(1, len(spec.neighbours)))),
                                                                seed + 101 + k, exclude=[spec.target])]
        out += [p for p, _ in world.iter_prompts_not_naming(spec.target, n - len(out), seed + 7)]
        return out[:n]
    neigh = [nb for nb in spec.neighbours]
    if not neigh:
        return []
    temps = spec.templates or ["a picture of {}"]
    return [temps[i % len(temps)].format(neigh[i % len(neigh)]) for i in range(n)]


@dataclasses.dataclass
class EvalGroup:
    name: str  # "target", "anchor", "neighbours.<x>", "paraphrases"
    concept: str  # the concept whose presence is measured
    prompts: list[str]


def eval_groups(spec: ConceptSpec, n: int, seed: int, toy: bool) -> list[EvalGroup]:
    """Prompt groups for evaluation: target, anchor, each neighbour, held-out paraphrases."""
    groups = []
    if toy and is_toy_concept(spec.target):
        excl_anchor = [spec.target] if world.attribute_of(spec.anchor) == world.attribute_of(spec.target) else []
        groups.append(EvalGroup("target", spec.target,
                                [p for p, _ in world.iter_prompts_naming(spec.target, n, seed)]))
        groups.append(EvalGroup("anchor", spec.anchor,
                                [p for p, _ in world.iter_prompts_naming(spec.anchor, n, seed + 1, exclude=excl_anchor)]))
        for k, nb in enumerate(spec.neighbours):
            groups.append(EvalGroup(f"neighbours.{nb}", nb, [p for p, _ in world.iter_prompts_naming(
                nb, n, seed + 10 + k, exclude=[spec.target])]))
        held = spec.paraphrases or toy_words(spec.target, held_out=True)
        if held:
            groups.append(EvalGroup("paraphrases", spec.target,
                                    [p for p, _ in world.iter_prompts_naming(spec.target, n, seed + 2, words=held)]))
        return groups
    pairs = caption_pairs(spec, n, seed, toy=False)
    groups.append(EvalGroup("target", spec.target, [c for c, _ in pairs]))
    groups.append(EvalGroup("anchor", spec.anchor, [a for _, a in pairs]))
    temps = spec.templates or ["a picture of {}"]
    for nb in spec.neighbours:
        groups.append(EvalGroup(f"neighbours.{nb}", nb, [temps[i % len(temps)].format(nb) for i in range(n)]))
    if spec.paraphrases:
        groups.append(EvalGroup("paraphrases", spec.target,
                                [temps[i % len(temps)].format(spec.paraphrases[i % len(spec.paraphrases)])
                                 for i in range(n)]))
    return groups


def concept_texts(concept: str, toy: bool) -> list[str]:
    """Texts that stand for a concept in CLIP accuracy: a prompt ensemble."""
    if toy and is_toy_concept(concept):
        attr = world.attribute_of(concept)
        canon = {"object": [world.OBJECT_WORDS[o][0] for o in world.OBJECTS], "colour": list(world.COLOURS),
                 "pattern": [world.PATTERN_WORDS[p][0] for p in world.PATTERNS]}
        canon[attr] = [toy_words(concept)[0]]
        return [f"a {c} {p} {o}" for o in canon["object"] for c in canon["colour"] for p in canon["pattern"]]
    return [concept, f"a photo of {concept}", f"a painting of {concept}", f"an image in the style of {concept}"]
