"""The toy world as a prompt world: its vocabulary, held-out paraphrases, built-in prompts and probe."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from .. import prompts as P
from ..worlds import PromptWorld
from . import world as worlds


class ToyWorld(PromptWorld):
    """Toy-world behaviour for the concepts it knows (patterns, colours, objects); a PromptWorld otherwise.

    Holds only the probe's path and the world's name (it is sent to Ray tasks and actors); the probe
    loads in `judge`. `world`: "v1" (the bundled default) or "v2" (`toyworld/v2.py`).
    """

    name = "toy"

    def __init__(self, probe_path: str | None = None, world: str = "v1"):
        self.probe_path = probe_path
        self.world_name = worlds.by_name(world).name

    @property
    def w(self) -> worlds.WorldDef:
        return worlds.by_name(self.world_name)

    @property
    def judge_note(self) -> str:
        v = "" if self.world_name == "v1" else f" {self.world_name}"
        return f"share of images the attribute probe reads as showing the group's concept (toy world{v})"

    def knows(self, concept: str) -> bool:
        """A value ("striped"), a composition ("striped zorb") or a category ("zorb or kubo") of the world."""
        try:
            self.w.attribute_of(concept)
            return True
        except KeyError:
            return False

    def words(self, concept: str, held_out: bool = False) -> list[str]:
        """The toy world's words for a concept value: training words, or the held-out paraphrases."""
        table = self.w.table(self.w.attribute_of(concept))
        return (worlds.held_out_words if held_out else worlds.train_words)(table)[concept]

    def _word_map(self, concept: str, held_out: bool = False) -> dict[str, list[str]]:
        """{value: words} of every part of a concept (see `self.w.concept_parts`)."""
        return {v: self.words(v, held_out) for v in self.w.concept_parts(concept)[1]}

    def _neighbours(self, spec) -> list[str]:
        """The concept's neighbours; for a composition, each of its parts too: "striped" and "zorb"
        must survive where they are not together."""
        c = P.target_concept(spec)
        op, parts = self.w.concept_parts(c)
        extra = [v for v in parts if op == "and" and len(parts) > 1 and v not in spec.neighbours]
        return [*spec.neighbours, *extra]

    def anchorize(self, caption: str, spec) -> str:
        """Every word of the target's attribute is replaced (a row the CLIP mask flags as being about
        "striped" has its pattern slot set to the anchor, whatever pattern it names). A composed
        anchor ("plain zorb" for "striped zorb") sets the slots of the parts it changes."""
        target = P.target_concept(spec)
        if not self.knows(target) or spec.anchor_kind != "text":
            return super().anchorize(caption, spec)
        parts = self.w.concept_parts(target)[1]
        if len(parts) == 1 or not self.knows(spec.anchor):
            table = self.w.table(self.w.attribute_of(target))
            return P.anchorize(caption, spec, [w for ws in table.values() for w in ws])
        out = caption
        for a in self.w.concept_parts(spec.anchor)[1]:
            if a in parts:  # a part the anchor keeps ("zorb" of "plain zorb"): its slot stays
                continue
            table = self.w.table(self.w.attribute_of(a))
            out = P._replace_words(out, [w for ws in table.values() for w in ws], self.words(a)[0])[0]
        return out

    def caption_pairs(self, spec, n: int, seed: int, exclude=()) -> list[tuple[str, str]]:
        """The concept's own prompts where it has some; else built-in prompts naming the target (a
        composition's prompts name every part; a category's name its members in turn), and none of
        the world's concepts in `exclude`."""
        text = spec.anchor_kind == "text"
        target = P.target_concept(spec)
        if P.has_own_prompts(spec) or not (self.knows(target) and (self.knows(spec.anchor) or not text)):
            return super().caption_pairs(spec, n, seed, exclude)
        words = self._word_map(target)
        if spec.synonyms and len(words) == 1:
            words = {v: [*ws, *spec.synonyms] for v, ws in words.items()}
        prompts = [p for p, _ in self.w.iter_prompts_naming(target, n, seed, words=words,
                                                            exclude=self._known(exclude))]
        if not text:  # the empty prompt, or an anchor image: no anchor caption
            return [(p, "") for p in prompts]
        one = len(self.w.concept_parts(target)[1]) == 1 and len(self.w.concept_parts(spec.anchor)[1]) == 1
        anchored = dataclasses.replace(spec, anchor=self.words(spec.anchor)[0]) if one else spec
        return [(p, self.anchorize(p, anchored)) for p in prompts]

    def memorized_here(self, spec) -> bool:
        """A memorized caption over this world's concepts: its neighbours are the world's, so their
        prompts and preservation rows come from the world (the caption's from the concept)."""
        return spec.kind == "memorized" and all(self.knows(nb) for nb in spec.neighbours)

    def _known(self, concepts) -> list[str]:
        return [c for c in concepts if self.knows(c)]

    def preservation_captions(self, spec, n: int, seed: int, exclude=()) -> list[str]:
        """The neighbours' prompts (half), then prompts of anything but the target; none names a
        concept of `exclude`."""
        target = P.target_concept(spec)
        if self.memorized_here(spec):  # half the neighbours' prompts, half any of the world's captions
            nbs = list(spec.neighbours)
            out = [p for k, nb in enumerate(nbs)
                   for p, _ in self.w.iter_prompts_naming(nb, max(1, n // (2 * len(nbs))), seed + 101 + k)]
            return (out + self.w.sample_captions(n - len(out), seed + 7))[:n]
        if not self.knows(target):
            return super().preservation_captions(spec, n, seed, exclude)
        out = []
        nbs = self._neighbours(spec)
        avoid = [target, *self._known(exclude)]
        for k, nb in enumerate(nbs):
            if self.knows(nb):
                out += [p for p, _ in self.w.iter_prompts_naming(nb, max(1, n // (2 * max(1, len(nbs)))),
                                                                seed + 101 + k, exclude=avoid)]
        out += [p for p, _ in self.w.iter_prompts_not_naming(target, n - len(out), seed + 7,
                                                              exclude=self._known(exclude))]
        return out[:n]

    def eval_groups(self, spec, n: int, seed: int) -> list[P.EvalGroup]:
        target = P.target_concept(spec)

        def naming(concept, s, **kw):
            return [p for p, _ in self.w.iter_prompts_naming(concept, n, s, **kw)]

        if self.memorized_here(spec):
            return P.memorized_groups(spec, n) + [P.EvalGroup(f"neighbours.{nb}", nb, naming(nb, seed + 10 + k))
                                                  for k, nb in enumerate(spec.neighbours)]
        if not self.knows(target):
            return super().eval_groups(spec, n, seed)

        op, parts = self.w.concept_parts(target)
        groups = [P.EvalGroup("target", target, naming(target, seed))]
        if spec.anchor_kind == "text":  # empty and image anchors have no anchor concept to keep
            same_attr = len(parts) > 1 or self.w.attribute_of(spec.anchor) == self.w.attribute_of(target)
            groups.append(P.EvalGroup("anchor", spec.anchor, naming(spec.anchor, seed + 1,
                                                                    exclude=[target] if same_attr else [])))
        if op == "or":  # a category: each member's own rate
            groups += [P.EvalGroup(f"members.{m}", m, naming(m, seed + 20 + k)) for k, m in enumerate(parts)]
        for k, nb in enumerate(self._neighbours(spec)):
            groups.append(P.EvalGroup(f"neighbours.{nb}", nb, naming(nb, seed + 10 + k, exclude=[target])))
        if len(parts) == 1:
            held = {target: spec.paraphrases or self.words(target, held_out=True)}
        else:  # each part's held-out word where it has one
            held = {v: self.words(v, held_out=True) or self.words(v) for v in parts}
            held = held if any(self.words(v, held_out=True) for v in parts) else {}
        if any(held.values()):
            groups.append(P.EvalGroup("paraphrases", target, naming(target, seed + 2, words=held)))
        return groups

    def concept_texts(self, concept: str) -> list[str]:
        if not self.knows(concept):
            return super().concept_texts(concept)
        op, parts = self.w.concept_parts(concept)
        if op == "or":
            return [t for m in parts for t in self.concept_texts(m)]
        w = self.w
        canon = {"object": [w.object_words[o][0] for o in w.objects], "colour": list(w.colours),
                 "pattern": [w.pattern_words[p][0] for p in w.patterns]}
        for v in parts:
            canon[self.w.attribute_of(v)] = [self.words(v)[0]]
        return [f"a {c} {p} {o}" for o in canon["object"] for c in canon["colour"] for p in canon["pattern"]]

    def named_concepts(self) -> list[str]:
        """Every named concept of the toy world: objects (characters, shapes), patterns, colours."""
        return self.w.concepts()

    def concept_words(self, spec) -> list[str]:
        words = super().concept_words(spec)
        target = P.target_concept(spec)
        if self.knows(target):
            for v in self.w.concept_parts(target)[1]:
                words += self.words(v) + self.words(v, held_out=True)
        return [w for w in words if w.strip()]

    def neighbour_words(self, neighbour: str) -> list[str]:
        if not self.knows(neighbour) or len(self.w.concept_parts(neighbour)[1]) != 1:
            return super().neighbour_words(neighbour)
        return self.words(neighbour) + self.words(neighbour, held_out=True)

    def mask_guard(self, spec) -> list[list[str]] | None:
        target = P.target_concept(spec)
        if P.has_own_prompts(spec) or not self.knows(target):
            return super().mask_guard(spec)
        op, parts = self.w.concept_parts(target)
        if op == "or" or len(parts) == 1:
            return None
        return [self.words(v) + self.words(v, held_out=True) for v in parts]

    def _probe(self) -> Path:
        from . import bundle_paths

        return Path(self.probe_path) if self.probe_path else bundle_paths(world=self.world_name)["probe"]

    def judge(self):
        from .probe import ProbeJudge

        return ProbeJudge(self._probe(), world=self.w)

    def judge_sha256(self) -> str | None:
        return hashlib.sha256(self._probe().read_bytes()).hexdigest()
