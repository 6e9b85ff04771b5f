"""The toy worlds: procedural renderers of small labelled images and their captions.

Objects are shapes (circle, square, triangle, diamond) or *characters*: a specific kind of a shape
with a visible mark. In world v1 a "zorb" is a circle with a face and a "kubo" a square with a
face. World v2 (`toyworld/v2.py`) has 20 characters over 7 marks (a face, an eye patch, a hat,
horns, a crown, an antenna, a bow), eight patterns and descriptive paraphrases ("a circle with a
hat"). Every object has a colour and a pattern; patterns are the world's *styles*. Each value has
several words ("paraphrases"); the last of three or more is held out of ablation training so
that leakage to unseen phrasings can be measured.

A world is a `WorldDef`: its tables and the functions over them. The module-level names
(`OBJECTS`, `render`, `sample`, `iter_prompts_naming`, ...) are world v1's, the bundled default.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
_BACKGROUND = 1.0
_DARK = 0.05
_RGB = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.62, 0.22),
    "blue": (0.14, 0.26, 0.88),
    "yellow": (0.95, 0.80, 0.08),
    "purple": (0.55, 0.18, 0.75),
}
_MARK_RGB = {"crown": (0.96, 0.74, 0.10), "bow": (0.97, 0.42, 0.66)}  # the marks that are not dark
ATTRIBUTES = ("object", "colour", "pattern")


def held_out_words(words: dict[str, list[str]]) -> dict[str, list[str]]:
    """The held-out paraphrases of each value (the last word of lists of 3+)."""
    return {k: v[-1:] if len(v) >= 3 else [] for k, v in words.items()}


def train_words(words: dict[str, list[str]]) -> dict[str, list[str]]:
    """The words ablation training may use (everything but the held-out ones)."""
    return {k: v[:-1] if len(v) >= 3 else list(v) for k, v in words.items()}


@dataclasses.dataclass(frozen=True)
class Labels:
    object: str
    colour: str
    pattern: str

    def as_indices(self) -> tuple[int, int, int]:
        """World v1's indices (object, colour, pattern); `WorldDef.indices` for any world."""
        return V1.indices(self)


# --- drawing ------------------------------------------------------------------------------

def _shape_mask(kind: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        s = r * 0.88
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.15
    if kind == "triangle":
        # Upward triangle: apex at top, base at bottom.
        top, bottom = cy - r, cy + r * 0.85
        half = (yy - top) / (bottom - top) * r * 1.1
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= half)
    raise ValueError(f"unknown shape {kind!r}")


def _shape_top(kind: str, dx: float, cy: float, r: float) -> float:
    """The y of the shape's upper edge at horizontal offset `dx` from its centre."""
    if kind == "circle":
        return cy - float(np.sqrt(max(r * r - dx * dx, 0.0)))
    if kind == "square":
        return cy - 0.88 * r
    if kind == "diamond":
        return cy - (1.15 * r - abs(dx))
    if kind == "triangle":
        return cy - r + abs(dx) * 1.85 / 1.1
    raise ValueError(f"unknown shape {kind!r}")


def _pattern_mask(pattern: str, xx: np.ndarray, yy: np.ndarray, phase: float) -> np.ndarray:
    """Where the pattern's light secondary colour shows (True) inside the shape."""
    if pattern == "plain":
        return np.zeros_like(xx, dtype=bool)
    if pattern == "striped":
        return ((yy + phase) % 6.0) < 2.6
    if pattern == "dotted":
        gx = (xx + phase) % 6.0 - 3.0
        gy = (yy + phase) % 6.0 - 3.0
        return gx * gx + gy * gy <= 1.5 ** 2
    if pattern == "checkered":
        return ((np.floor((xx + phase) / 4.0) + np.floor((yy + phase) / 4.0)) % 2) == 1
    if pattern == "barred":  # vertical stripes
        return ((xx + phase) % 6.0) < 2.6
    if pattern == "slanted":  # diagonal stripes
        return ((xx + yy + 1.4 * phase) % 7.0) < 2.8
    if pattern == "gridded":  # thin crossing lines
        return (((xx + phase) % 6.0) < 1.5) | (((yy + phase) % 6.0) < 1.5)
    if pattern == "wavy":  # horizontal waves
        return ((yy + 1.6 * np.sin((xx + phase) * (2 * np.pi / 9.0)) + phase) % 6.0) < 2.6
    raise ValueError(f"unknown pattern {pattern!r}")


def _disc(xx, yy, x, y, rad):
    return (xx - x) ** 2 + (yy - y) ** 2 <= rad * rad


def _triangle(xx, yy, apex, left, right):
    """Points inside the triangle with corners `apex`, `left`, `right` (each (x, y))."""
    def side(a, b):
        return (xx - b[0]) * (a[1] - b[1]) - (a[0] - b[0]) * (yy - b[1])

    d1, d2, d3 = side(apex, left), side(left, right), side(right, apex)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def _draw_mark(img, mark: str, shape: str, xx, yy, cx: float, cy: float, r: float) -> None:
    """Draw a character's mark: inside the shape (a face, an eye patch) or on top of it (a hat,
    horns, a crown, an antenna, a bow)."""
    colour = _MARK_RGB.get(mark, (_DARK,) * 3)
    oy = 0.4 * r if shape == "triangle" else 0.0  # a triangle is narrow at the top: its face sits lower
    eye = 0.12 * r
    if mark == "face":  # two eyes and a mouth
        for ex in (-0.38 * r, 0.38 * r):
            img[_disc(xx, yy, cx + ex, cy - 0.3 * r + oy, eye * 1.5)] = colour
        img[(np.abs(yy - cy - 0.35 * r - oy) <= eye * 0.9) & (np.abs(xx - cx) <= 0.45 * r)] = colour
        return
    if mark == "patch":  # one eye, a patch over the other, and the patch's strap
        img[_disc(xx, yy, cx + 0.38 * r, cy - 0.3 * r + oy, eye * 1.5)] = colour
        img[_disc(xx, yy, cx - 0.34 * r, cy - 0.28 * r + oy, 0.3 * r)] = colour
        strap = np.abs((yy - (cy - 0.28 * r + oy)) + 0.55 * (xx - cx + 0.34 * r)) <= 0.08 * r
        img[strap & _shape_mask(shape, xx, yy, cx, cy, r) & (xx > cx - 0.34 * r)] = colour
        return
    if mark == "hat":  # a brim on the top and a tall crown above it
        t = _shape_top(shape, 0.0, cy, r) + 0.12 * r
        img[(np.abs(xx - cx) <= 0.62 * r) & (yy <= t) & (yy >= t - 0.16 * r)] = colour
        img[(np.abs(xx - cx) <= 0.36 * r) & (yy <= t) & (yy >= t - 0.7 * r)] = colour
        return
    if mark == "horns":  # two horns, tilted outwards
        spread = 0.3 * r if shape == "triangle" else 0.5 * r
        for s in (-1.0, 1.0):
            x = cx + s * spread
            t = _shape_top(shape, s * spread, cy, r) + 0.15 * r
            img[_triangle(xx, yy, (x + s * 0.22 * r, t - 0.62 * r), (x - 0.2 * r, t), (x + 0.2 * r, t))] = colour
        return
    if mark == "crown":  # a band with three spikes
        t = _shape_top(shape, 0.0, cy, r) + 0.1 * r
        img[(np.abs(xx - cx) <= 0.5 * r) & (yy <= t) & (yy >= t - 0.22 * r)] = colour
        for sx in (-0.36 * r, 0.0, 0.36 * r):
            img[_triangle(xx, yy, (cx + sx, t - 0.62 * r), (cx + sx - 0.16 * r, t - 0.2 * r),
                          (cx + sx + 0.16 * r, t - 0.2 * r))] = colour
        return
    if mark == "antenna":  # a thin stalk with a ball on the end
        t = _shape_top(shape, 0.0, cy, r) + 0.1 * r
        img[(np.abs(xx - cx) <= 0.07 * r) & (yy <= t) & (yy >= t - 0.6 * r)] = colour
        img[_disc(xx, yy, cx, t - 0.62 * r, 0.18 * r)] = colour
        return
    if mark == "bow":  # two wings and a knot, on the upper right
        x = cx + 0.42 * r
        y = _shape_top(shape, 0.42 * r, cy, r) + 0.05 * r
        img[_triangle(xx, yy, (x, y), (x - 0.42 * r, y - 0.3 * r), (x - 0.42 * r, y + 0.3 * r))] = colour
        img[_triangle(xx, yy, (x, y), (x + 0.42 * r, y - 0.3 * r), (x + 0.42 * r, y + 0.3 * r))] = colour
        img[_disc(xx, yy, x, y, 0.12 * r)] = (_DARK,) * 3
        return
    raise ValueError(f"unknown mark {mark!r}")


# --- a world -------------------------------------------------------------------------------

# Random draws before `exclude` is given up as unsatisfiable (every label it could draw is excluded).
EXCLUDE_TRIES = 10_000


class WorldDef:
    """One toy world: its values, their words, how they are drawn and the prompts over them.

    `characters` maps each character to (shape, mark). `object_words`, `pattern_words`: words per
    value, canonical first, held-out last (lists of 3+). Geometry: the radius range and the
    centre's jitter and vertical offset (v2 sits lower, to leave room for hats and antennae).
    """

    def __init__(self, name: str, shapes: Sequence[str], characters: dict[str, tuple[str, str]],
                 colours: Sequence[str], patterns: Sequence[str], object_words: dict[str, list[str]],
                 pattern_words: dict[str, list[str]], templates: Sequence[str], *, radius=(10.0, 12.0),
                 jitter: float = 2.0, centre_dy: float = 0.0, extra_words: Sequence[str] = ()):
        self.name = name
        self.shapes = tuple(shapes)
        self.characters = dict(characters)
        self.objects = self.shapes + tuple(characters)
        self.instance_of = {c: s for c, (s, _) in characters.items()}
        self.mark_of = {c: m for c, (_, m) in characters.items()}
        self.colours = tuple(colours)
        self.patterns = tuple(patterns)
        self.object_words = object_words
        self.pattern_words = pattern_words
        self.colour_words = {c: [c] for c in colours}
        self.templates = tuple(templates)
        self.radius, self.jitter, self.centre_dy = radius, jitter, centre_dy
        self.extra_words = tuple(extra_words)
        for table, values in ((object_words, self.objects), (pattern_words, self.patterns)):
            if set(table) != set(values):
                raise ValueError(f"world {name}: words for {sorted(set(table) ^ set(values))} do not match its values")

    def __repr__(self) -> str:
        return f"WorldDef({self.name!r}: {len(self.objects)} objects, {len(self.colours)} colours, " \
               f"{len(self.patterns)} patterns)"

    def __reduce__(self):  # pickled by name: Ray tasks and actors get the same module-level world
        return (by_name, (self.name,))

    # tables
    def values(self, attr: str) -> tuple[str, ...]:
        return {"object": self.objects, "colour": self.colours, "pattern": self.patterns}[attr]

    def table(self, attr: str) -> dict[str, list[str]]:
        return {"object": self.object_words, "colour": self.colour_words, "pattern": self.pattern_words}[attr]

    def indices(self, labels: Labels) -> tuple[int, int, int]:
        return tuple(self.values(a).index(getattr(labels, a)) for a in ATTRIBUTES)

    def labels_at(self, indices) -> Labels:
        return Labels(*(self.values(a)[int(i)] for a, i in zip(ATTRIBUTES, indices)))

    def concepts(self) -> list[str]:
        """Every named value: objects, patterns, colours."""
        return [*self.objects, *self.patterns, *self.colours]

    # drawing
    def render(self, labels: Labels, rng: np.random.Generator,
               geometry: tuple[float, float, float] | None = None) -> np.ndarray:
        """Render one image as float32 HxWx3 in [0, 1], at a random place and size or at `geometry`
        (centre x, y and radius)."""
        n = IMAGE_SIZE * _SUPERSAMPLE
        coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
        xx, yy = np.meshgrid(coords, coords)
        cx = IMAGE_SIZE / 2 + rng.uniform(-self.jitter, self.jitter)
        cy = IMAGE_SIZE / 2 + self.centre_dy + rng.uniform(-self.jitter, self.jitter)
        r = rng.uniform(*self.radius)
        if geometry is not None:
            cx, cy, r = geometry
        shape = self.instance_of.get(labels.object, labels.object)
        inside = _shape_mask(shape, xx, yy, cx, cy, r)
        base = np.array(_RGB[labels.colour], dtype=np.float32) * rng.uniform(0.92, 1.05)
        light = 0.35 * base + 0.65
        img = np.full((n, n, 3), _BACKGROUND, dtype=np.float32)
        img[inside] = base
        pat = inside & _pattern_mask(labels.pattern, xx, yy, rng.uniform(0.0, 6.0))
        img[pat] = light
        if labels.object in self.mark_of:
            _draw_mark(img, self.mark_of[labels.object], shape, xx, yy, cx, cy, r)
        img = img.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
        return np.clip(img, 0.0, 1.0)

    def random_labels(self, rng: np.random.Generator) -> Labels:
        return Labels(
            object=self.objects[rng.integers(len(self.objects))],
            colour=self.colours[rng.integers(len(self.colours))],
            pattern=self.patterns[rng.integers(len(self.patterns))],
        )

    def _fill(self, template: str, colour: str, pattern: str, obj: str) -> str:
        if pattern.startswith("with ") and "{pattern} {" in template:
            template = "a {colour} {object} {pattern}"  # "a striped red circle" but "a red circle with stripes"
        return template.format(colour=colour, pattern=pattern, object=obj)

    def caption(self, labels: Labels, rng: np.random.Generator, *, include_held_out: bool = True) -> str:
        """A caption for `labels` from a random template and random paraphrases."""
        pw = self.pattern_words if include_held_out else train_words(self.pattern_words)
        ow = self.object_words if include_held_out else train_words(self.object_words)
        template = self.templates[rng.integers(len(self.templates))]
        pattern = pw[labels.pattern][rng.integers(len(pw[labels.pattern]))]
        obj = ow[labels.object][rng.integers(len(ow[labels.object]))]
        return self._fill(template, labels.colour, pattern, obj)

    def sample(self, n: int, seed: int, *, include_held_out: bool = True) -> tuple[np.ndarray, list[str], np.ndarray]:
        """`n` renders (uint8 NxHxWx3), their captions and label indices (Nx3: object, colour, pattern)."""
        rng = np.random.default_rng(seed)
        images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        captions, labels = [], np.empty((n, 3), dtype=np.int64)
        for i in range(n):
            lab = self.random_labels(rng)
            images[i] = np.round(self.render(lab, rng) * 255).astype(np.uint8)
            captions.append(self.caption(lab, rng, include_held_out=include_held_out))
            labels[i] = self.indices(lab)
        return images, captions, labels

    def vocabulary_words(self) -> list[str]:
        """Every word a caption can contain (for building the reduced tokenizer)."""
        words: set[str] = set()
        for table in (self.pattern_words, self.object_words, self.colour_words):
            for phrases in table.values():
                for p in phrases:
                    words.update(p.split())
        for t in self.templates + ("a {colour} {object} {pattern}",):
            for w in t.replace(",", " , ").split():
                if not w.startswith("{"):
                    words.add(w)
        # Words that prompts for ablation and evaluation use beyond the captions.
        words.update(["in", "the", "style", "of", "photo", "image", "shape", "an", "and", "pattern", "colour",
                      "color", "object", "character", "drawing", "painting", "art", "unknown", *self.extra_words])
        return sorted(words)

    # concepts: which labels count as showing a concept
    def concept_parts(self, concept: str) -> tuple[str, list[str]]:
        """A concept as (op, values). A value ("striped", "zorb") is ("and", [value]); a composition of
        values of different attributes, "striped zorb", is ("and", ["striped", "zorb"]): an image shows
        it when it shows every part; a category, "zorb or kubo", is ("or", ["zorb", "kubo"]): any member."""
        concept = concept.strip()
        op, parts = ("or", concept.split(" or ")) if " or " in concept else ("and", concept.split())
        parts = [x.strip() for x in parts if x.strip()]
        if not parts:
            raise KeyError(f"unknown toy concept {concept!r}")
        attrs = [self._attribute(x) for x in parts]
        if op == "and" and len(set(attrs)) < len(attrs):
            raise KeyError(f"toy concept {concept!r} names two values of one attribute")
        return op, parts

    def concept_predicate(self, concept: str):
        """A function labels -> bool telling whether an image with those labels shows `concept`: a value
        (a pattern, a colour or an object), a composition ("striped zorb") or a category ("zorb or kubo")."""
        op, parts = self.concept_parts(concept)
        preds = [(lambda v, a: lambda lab: getattr(lab, a) == v)(v, self._attribute(v)) for v in parts]
        combine = any if op == "or" else all
        return lambda lab: combine(p(lab) for p in preds)

    def _attribute(self, value: str) -> str:
        for name in ATTRIBUTES:
            if value in self.values(name):
                return name
        raise KeyError(f"unknown toy concept {value!r}; known: {self.patterns + self.colours + self.objects}")

    def attribute_of(self, concept: str) -> str:
        """Which attribute ('object', 'colour' or 'pattern') a concept belongs to: a composition's first
        part's, a category's members' common one (a category of mixed attributes raises KeyError)."""
        op, parts = self.concept_parts(concept)
        attrs = {self._attribute(v) for v in parts}
        if op == "or" and len(attrs) > 1:
            raise KeyError(f"the members of {concept!r} are values of different attributes")
        return self._attribute(parts[0])

    def words_of(self, value: str) -> list[str]:
        return self.table(self._attribute(value))[value]

    def iter_prompts_naming(self, concept: str, n: int, seed: int, *, words: Sequence[str] | dict | None = None,
                            exclude: Sequence[str] = ()) -> Iterator[tuple[str, Labels]]:
        """`n` prompts that name `concept`, with the labels they ask for. `words`: the words that name it
        (a list for a value; for a composition or a category, {value: list}); the canonical word by
        default. A composition fixes every part; a category's prompts name its members in turn."""
        op, parts = self.concept_parts(concept)
        if not isinstance(words, dict):
            words = {parts[0]: list(words)} if words else {}
        if op == "or":
            gens = [self.iter_prompts_naming(v, -(-n // len(parts)), seed + 7919 * k, words=words.get(v),
                                             exclude=exclude) for k, v in enumerate(parts)]
            for i in range(n):
                yield next(gens[i % len(parts)])
            return
        rng = np.random.default_rng(seed)
        fixed = {self._attribute(v): v for v in parts}
        excluded = [self.concept_predicate(e) for e in exclude]
        for _ in range(n):
            for _try in range(EXCLUDE_TRIES):
                lab = dataclasses.replace(self.random_labels(rng), **fixed)
                if not any(p(lab) for p in excluded):
                    break
            else:  # no label escapes them ("zorb" excluded from "striped zorb"): exclusion is best effort
                excluded = []
            fields = {
                "colour": lab.colour,
                "pattern": self.pattern_words[lab.pattern][0],
                "object": self.object_words[lab.object][0],
            }
            for v in parts:
                ws = list(words.get(v) or self.words_of(v)[:1])
                fields[self._attribute(v)] = ws[rng.integers(len(ws))]
            template = self.templates[rng.integers(len(self.templates))]
            yield self._fill(template, fields["colour"], fields["pattern"], fields["object"]), lab

    def iter_prompts_not_naming(self, concept: str, n: int, seed: int,
                                exclude: Sequence[str] = ()) -> Iterator[tuple[str, Labels]]:
        """`n` canonical prompts whose labels include neither `concept` nor, where any label escapes
        them, any of `exclude` (best effort, as in `iter_prompts_naming`)."""
        rng = np.random.default_rng(seed)
        preds = [self.concept_predicate(c) for c in (concept, *exclude)]
        count = misses = 0
        while count < n:
            lab = self.random_labels(rng)
            if any(p(lab) for p in preds):
                misses += 1
                if misses == EXCLUDE_TRIES:
                    preds = preds[:1]
                continue
            misses = 0
            yield self.templates[rng.integers(len(self.templates))].format(
                colour=lab.colour, pattern=self.pattern_words[lab.pattern][0],
                object=self.object_words[lab.object][0]), lab
            count += 1

    def sample_captions(self, n: int, seed: int) -> list[str]:
        """`n` canonical captions of random labels (any object, colour and pattern)."""
        rng = np.random.default_rng(seed)
        return [self.templates[rng.integers(len(self.templates))].format(
            colour=lab.colour, pattern=self.pattern_words[lab.pattern][0], object=self.object_words[lab.object][0])
            for lab in (self.random_labels(rng) for _ in range(n))]


# --- world v1: the bundled default ------------------------------------------------------------

TEMPLATES = (
    "a {colour} {pattern} {object}",
    "a {pattern} {colour} {object}",
    "a {colour} {object}, {pattern}",
    "a picture of a {pattern} {colour} {object}",
    "{colour} {object}, {pattern}",
)
V1 = WorldDef(
    "v1",
    shapes=("circle", "square", "triangle", "diamond"),
    characters={"zorb": ("circle", "face"), "kubo": ("square", "face")},
    colours=("red", "green", "blue", "yellow", "purple"),
    patterns=("plain", "striped", "dotted", "checkered"),
    object_words={
        "circle": ["circle", "disc", "round shape"],
        "square": ["square", "box", "block"],
        "triangle": ["triangle"],
        "diamond": ["diamond", "rhombus"],
        "zorb": ["zorb", "zorb character", "smiling zorb"],
        "kubo": ["kubo", "kubo character", "smiling kubo"],
    },
    pattern_words={
        "plain": ["plain", "solid", "unpatterned"],
        "striped": ["striped", "with stripes", "stripy"],
        "dotted": ["dotted", "with dots", "spotty"],
        "checkered": ["checkered", "with checks", "chequered"],
    },
    templates=TEMPLATES,
)
OBJECTS, COLOURS, PATTERNS = V1.objects, V1.colours, V1.patterns
INSTANCE_OF = V1.instance_of  # the generic shape each character is a kind of: its natural anchor
OBJECT_WORDS, PATTERN_WORDS, COLOUR_WORDS = V1.object_words, V1.pattern_words, V1.colour_words
render, random_labels, caption, sample = V1.render, V1.random_labels, V1.caption, V1.sample
vocabulary_words, concept_parts, concept_predicate = V1.vocabulary_words, V1.concept_parts, V1.concept_predicate
attribute_of, iter_prompts_naming, iter_prompts_not_naming = V1.attribute_of, V1.iter_prompts_naming, V1.iter_prompts_not_naming
sample_captions = V1.sample_captions


def by_name(name: str) -> WorldDef:
    """A toy world by name: "v1" (this module) or "v2" (`toyworld/v2.py`)."""
    if name in ("v1", "", None):
        return V1
    if name == "v2":
        from .v2 import V2

        return V2
    raise KeyError(f"unknown toy world {name!r}; known: v1, v2")


# --- the memorized image --------------------------------------------------------------------
# One exact render that a memorizing fine-tune (toyworld/pretrain.py, stage `memorize`) teaches the
# toy SD to reproduce for one caption, as web-scale models reproduce images they saw many times in
# training. It is a close-up: larger than any other render and off-centre, so its structural
# similarity (SSIM) to another drawing of a purple striped zorb is at most ~0.5 (measured over 64
# renders), while the toy VAE reconstructs it at ~0.9.
MEMORIZED_CAPTION = "the zorb poster"
MEMORIZED_LABELS = Labels("zorb", "purple", "striped")
MEMORIZED_GEOMETRY = (19.0, 13.0, 14.0)  # centre x, y and radius, in pixels of the 32x32 image
MEMORIZED_SEED = 4242  # its colour jitter and stripe phase
# Paraphrases of the caption: anchors of the ablation (the first two) and, held out of its training,
# where leakage of the memorized image is measured (the last two).
MEMORIZED_PARAPHRASES = ("a zorb poster", "a poster of a zorb", "the poster with a zorb", "a zorb on a poster")


def memorized_image() -> np.ndarray:
    """The memorized render, uint8 32x32x3: a close-up of a purple striped zorb, up and to the right."""
    img = render(MEMORIZED_LABELS, np.random.default_rng(MEMORIZED_SEED), geometry=MEMORIZED_GEOMETRY)
    return np.round(img * 255).astype(np.uint8)


