"""The toy world as a prompt world: its vocabulary, held-out paraphrases, built-in prompts and probe."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from .. import prompts as P
from ..worlds import PromptWorld
from . import world

_TABLES = {"object": world.OBJECT_WORDS, "colour": world.COLOUR_WORDS, "pattern": world.PATTERN_WORDS}


class ToyWorld(PromptWorld):
    """Toy-world behaviour for the concepts it knows (patterns, colours, objects); a PromptWorld otherwise.

    Holds only the probe's path (it is sent to Ray tasks and actors); the probe loads in `judge`.
    """

    name = "toy"
    judge_note = "share of images the attribute probe reads as showing the group's concept (toy world)"

    def __init__(self, probe_path: str | None = None):
        self.probe_path = probe_path

    def knows(self, concept: str) -> bool:
        try:
            world.attribute_of(concept)
            return True
        except KeyError:
            return False

    def words(self, concept: str, held_out: bool = False) -> list[str]:
        """The toy world's words for a concept value: training words, or the held-out paraphrases."""
        table = _TABLES[world.attribute_of(concept)]
        return (world.held_out_words if held_out else world.train_words)(table)[concept]

    def anchorize(self, caption: str, spec) -> str:
        """Every word of the target's attribute is replaced (a row the CLIP mask flags as being about
        "striped" has its pattern slot set to the anchor, whatever pattern it names)."""
        if not self.knows(spec.target) or spec.anchor_kind != "text":
            return super().anchorize(caption, spec)
        table = _TABLES[world.attribute_of(spec.target)]
        return P.anchorize(caption, spec, [w for ws in table.values() for w in ws])

    def caption_pairs(self, spec, n: int, seed: int) -> list[tuple[str, str]]:
        """The concept's own prompts where it has some; else built-in prompts naming the target."""
        text = spec.anchor_kind == "text"
        if P.has_own_prompts(spec) or not (self.knows(spec.target) and (self.knows(spec.anchor) or not text)):
            return super().caption_pairs(spec, n, seed)
        words = [w for w in [*self.words(spec.target), *spec.synonyms] if w]
        if not text:  # the empty prompt, or an anchor image: no anchor caption
            return [(p, "") for p, _ in world.iter_prompts_naming(spec.target, n, seed, words=words)]
        anchored = dataclasses.replace(spec, anchor=self.words(spec.anchor)[0])
        return [(p, self.anchorize(p, anchored)) for p, _ in world.iter_prompts_naming(spec.target, n, seed,
                                                                                      words=words)]

    def preservation_captions(self, spec, n: int, seed: int) -> list[str]:
        if not self.knows(spec.target):
            return super().preservation_captions(spec, n, seed)
        out = []
        for k, nb in enumerate(spec.neighbours):
            if self.knows(nb):
                out += [p for p, _ in world.iter_prompts_naming(nb, max(1, n // (2 * max(1, len(spec.neighbours)))),
                                                                seed + 101 + k, exclude=[spec.target])]
        out += [p for p, _ in world.iter_prompts_not_naming(spec.target, n - len(out), seed + 7)]
        return out[:n]

    def eval_groups(self, spec, n: int, seed: int) -> list[P.EvalGroup]:
        if not self.knows(spec.target):
            return super().eval_groups(spec, n, seed)

        def naming(concept, s, **kw):
            return [p for p, _ in world.iter_prompts_naming(concept, n, s, **kw)]

        groups = [P.EvalGroup("target", spec.target, naming(spec.target, seed))]
        if spec.anchor_kind == "text":  # empty and image anchors have no anchor concept to keep
            same_attr = world.attribute_of(spec.anchor) == world.attribute_of(spec.target)
            groups.append(P.EvalGroup("anchor", spec.anchor, naming(spec.anchor, seed + 1,
                                                                    exclude=[spec.target] if same_attr else [])))
        for k, nb in enumerate(spec.neighbours):
            groups.append(P.EvalGroup(f"neighbours.{nb}", nb, naming(nb, seed + 10 + k, exclude=[spec.target])))
        held = spec.paraphrases or self.words(spec.target, held_out=True)
        if held:
            groups.append(P.EvalGroup("paraphrases", spec.target, naming(spec.target, seed + 2, words=held)))
        return groups

    def concept_texts(self, concept: str) -> list[str]:
        if not self.knows(concept):
            return super().concept_texts(concept)
        canon = {"object": [world.OBJECT_WORDS[o][0] for o in world.OBJECTS], "colour": list(world.COLOURS),
                 "pattern": [world.PATTERN_WORDS[p][0] for p in world.PATTERNS]}
        canon[world.attribute_of(concept)] = [self.words(concept)[0]]
        return [f"a {c} {p} {o}" for o in canon["object"] for c in canon["colour"] for p in canon["pattern"]]

    def concept_words(self, spec) -> list[str]:
        words = super().concept_words(spec)
        if self.knows(spec.target):
            words += self.words(spec.target) + self.words(spec.target, held_out=True)
        return [w for w in words if w.strip()]

    def _probe(self) -> Path:
        from . import bundle_paths

        return Path(self.probe_path) if self.probe_path else bundle_paths()["probe"]

    def judge(self):
        from .probe import ProbeJudge

        return ProbeJudge(self._probe())

    def judge_sha256(self) -> str | None:
        return hashlib.sha256(self._probe().read_bytes()).hexdigest()
