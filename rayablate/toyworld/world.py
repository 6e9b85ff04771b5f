"""The toy world: a procedural renderer of small labelled images and their captions.

Objects are shapes (circle, square, triangle, diamond) or *instances* — characters
that are a specific kind of a shape: a "zorb" is a circle with a face, a "kubo" a
square with a face. Every object has a colour and a pattern; patterns are the
world's *styles*. Each label has several words ("paraphrases"); some are held
out of ablation training so that leakage to unseen phrasings can be measured.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

OBJECTS = ("circle", "square", "triangle", "diamond", "zorb", "kubo")
# The generic shape each instance is a kind of: its natural anchor.
INSTANCE_OF = {"zorb": "circle", "kubo": "square"}
COLOURS = ("red", "green", "blue", "yellow", "purple")
PATTERNS = ("plain", "striped", "dotted", "checkered")

_RGB = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.62, 0.22),
    "blue": (0.14, 0.26, 0.88),
    "yellow": (0.95, 0.80, 0.08),
    "purple": (0.55, 0.18, 0.75),
}
_BACKGROUND = 1.0

# Words for each value. The first is the canonical word; the last word of every
# list with three or more entries is *held out*: the pretrained model learns it,
# ablation training never sees it, and evaluation measures leakage through it.
PATTERN_WORDS = {
    "plain": ["plain", "solid", "unpatterned"],
    "striped": ["striped", "with stripes", "stripy"],
    "dotted": ["dotted", "with dots", "spotty"],
    "checkered": ["checkered", "with checks", "chequered"],
}
OBJECT_WORDS = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "rhombus"],
    "zorb": ["zorb", "zorb character", "smiling zorb"],
    "kubo": ["kubo", "kubo character", "smiling kubo"],
}
COLOUR_WORDS = {c: [c] for c in COLOURS}

TEMPLATES = (
    "a {colour} {pattern} {object}",
    "a {pattern} {colour} {object}",
    "a {colour} {object}, {pattern}",
    "a picture of a {pattern} {colour} {object}",
    "{colour} {object}, {pattern}",
)


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
        return OBJECTS.index(self.object), COLOURS.index(self.colour), PATTERNS.index(self.pattern)


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
    raise ValueError(f"unknown pattern {pattern!r}")


def render(labels: Labels, rng: np.random.Generator, geometry: tuple[float, float, float] | None = None) -> np.ndarray:
    """Render one image as float32 HxWx3 in [0, 1], at a random place and size or at `geometry`
    (centre x, y and radius)."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    xx, yy = np.meshgrid(coords, coords)
    cx = IMAGE_SIZE / 2 + rng.uniform(-2.0, 2.0)
    cy = IMAGE_SIZE / 2 + rng.uniform(-2.0, 2.0)
    r = rng.uniform(10.0, 12.0)
    if geometry is not None:
        cx, cy, r = geometry
    shape = INSTANCE_OF.get(labels.object, labels.object)
    inside = _shape_mask(shape, xx, yy, cx, cy, r)
    base = np.array(_RGB[labels.colour], dtype=np.float32) * rng.uniform(0.92, 1.05)
    light = 0.35 * base + 0.65
    img = np.full((n, n, 3), _BACKGROUND, dtype=np.float32)
    img[inside] = base
    pat = inside & _pattern_mask(labels.pattern, xx, yy, rng.uniform(0.0, 6.0))
    img[pat] = light
    if labels.object in INSTANCE_OF:  # the character's face: two eyes and a mouth
        eye = 0.12 * r
        for ex in (-0.38 * r, 0.38 * r):
            e = ((xx - cx - ex) ** 2 + (yy - cy + 0.3 * r) ** 2) <= (eye * 1.5) ** 2
            img[e] = 0.05
        mouth = (np.abs(yy - cy - 0.35 * r) <= eye * 0.9) & (np.abs(xx - cx) <= 0.45 * r)
        img[mouth] = 0.05
    img = img.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(img, 0.0, 1.0)


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


def random_labels(rng: np.random.Generator) -> Labels:
    return Labels(
        object=OBJECTS[rng.integers(len(OBJECTS))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
    )


def caption(labels: Labels, rng: np.random.Generator, *, include_held_out: bool = True) -> str:
    """A caption for `labels` from a random template and random paraphrases."""
    pw = PATTERN_WORDS if include_held_out else train_words(PATTERN_WORDS)
    ow = OBJECT_WORDS if include_held_out else train_words(OBJECT_WORDS)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    pattern = pw[labels.pattern][rng.integers(len(pw[labels.pattern]))]
    obj = ow[labels.object][rng.integers(len(ow[labels.object]))]
    if pattern.startswith("with ") and "{pattern} {" in template:
        template = "a {colour} {object} {pattern}"  # "a striped red circle" but "a red circle with stripes"
    return template.format(colour=labels.colour, pattern=pattern, object=obj)


def sample(n: int, seed: int, *, include_held_out: bool = True) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`n` renders (uint8 NxHxWx3), their captions and label indices (Nx3: object, colour, pattern)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions, labels = [], np.empty((n, 3), dtype=np.int64)
    for i in range(n):
        lab = random_labels(rng)
        images[i] = np.round(render(lab, rng) * 255).astype(np.uint8)
        captions.append(caption(lab, rng, include_held_out=include_held_out))
        labels[i] = lab.as_indices()
    return images, captions, labels


def vocabulary_words() -> list[str]:
    """Every word a toy caption can contain (for building the reduced tokenizer)."""
    words: set[str] = set()
    for table in (PATTERN_WORDS, OBJECT_WORDS, COLOUR_WORDS):
        for phrases in table.values():
            for p in phrases:
                words.update(p.split())
    for t in TEMPLATES + ("a {colour} {object} {pattern}",):
        for w in t.replace(",", " , ").split():
            if not w.startswith("{"):
                words.add(w)
    # Words that prompts for ablation and evaluation use beyond the captions.
    words.update(["in", "the", "style", "of", "photo", "image", "shape", "an", "and", "pattern", "colour", "color",
                  "object", "character", "drawing", "painting", "art", "unknown"])
    return sorted(words)


# --- concepts: which labels count as showing a concept ------------------------------------

def concept_parts(concept: str) -> tuple[str, list[str]]:
    """A concept as (op, values). A value ("striped", "zorb") is ("and", [value]); a composition of
    values of different attributes, "striped zorb", is ("and", ["striped", "zorb"]): an image shows it
    when it shows every part; a category, "zorb or kubo", is ("or", ["zorb", "kubo"]): any member."""
    concept = concept.strip()
    op, parts = ("or", concept.split(" or ")) if " or " in concept else ("and", concept.split())
    parts = [x.strip() for x in parts if x.strip()]
    if not parts:
        raise KeyError(f"unknown toy concept {concept!r}")
    attrs = [_attribute(x) for x in parts]
    if op == "and" and len(set(attrs)) < len(attrs):
        raise KeyError(f"toy concept {concept!r} names two values of one attribute")
    return op, parts


def concept_predicate(concept: str):
    """A function labels -> bool telling whether an image with those labels shows `concept`: a value
    (a pattern, a colour or an object), a composition ("striped zorb") or a category ("zorb or kubo")."""
    op, parts = concept_parts(concept)
    preds = [(lambda v, a: lambda lab: getattr(lab, a) == v)(v, _attribute(v)) for v in parts]
    combine = any if op == "or" else all
    return lambda lab: combine(p(lab) for p in preds)


def _attribute(value: str) -> str:
    for name, values in (("object", OBJECTS), ("colour", COLOURS), ("pattern", PATTERNS)):
        if value in values:
            return name
    raise KeyError(f"unknown toy concept {value!r}; known: {PATTERNS + COLOURS + OBJECTS}")


def attribute_of(concept: str) -> str:
    """Which attribute ('object', 'colour' or 'pattern') a concept belongs to: a composition's first
    part's, a category's members' common one (a category of mixed attributes raises KeyError)."""
    op, parts = concept_parts(concept)
    attrs = {_attribute(v) for v in parts}
    if op == "or" and len(attrs) > 1:
        raise KeyError(f"the members of {concept!r} are values of different attributes")
    return _attribute(parts[0])


def _words_of(value: str) -> list[str]:
    return {"object": OBJECT_WORDS, "colour": COLOUR_WORDS, "pattern": PATTERN_WORDS}[_attribute(value)][value]


def iter_prompts_naming(concept: str, n: int, seed: int, *, words: Sequence[str] | dict | None = None,
                        exclude: Sequence[str] = ()) -> Iterator[tuple[str, Labels]]:
    """`n` prompts that name `concept`, with the labels they ask for. `words`: the words that name it
    (a list for a value; for a composition or a category, {value: list}); the canonical word by default.
    A composition fixes every part; a category's prompts name its members in turn."""
    op, parts = concept_parts(concept)
    if not isinstance(words, dict):
        words = {parts[0]: list(words)} if words else {}
    if op == "or":
        gens = [iter_prompts_naming(v, -(-n // len(parts)), seed + 7919 * k, words=words.get(v), exclude=exclude)
                for k, v in enumerate(parts)]
        for i in range(n):
            yield next(gens[i % len(parts)])
        return
    rng = np.random.default_rng(seed)
    fixed = {_attribute(v): v for v in parts}
    for _ in range(n):
        while True:
            lab = dataclasses.replace(random_labels(rng), **fixed)
            if not any(concept_predicate(e)(lab) for e in exclude):
                break
        fields = {
            "colour": lab.colour,
            "pattern": PATTERN_WORDS[lab.pattern][0],
            "object": OBJECT_WORDS[lab.object][0],
        }
        for v in parts:
            ws = list(words.get(v) or _words_of(v)[:1])
            fields[_attribute(v)] = ws[rng.integers(len(ws))]
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        if fields["pattern"].startswith("with ") and "{pattern} {" in template:
            template = "a {colour} {object} {pattern}"
        yield template.format(**fields), lab


def iter_prompts_not_naming(concept: str, n: int, seed: int) -> Iterator[tuple[str, Labels]]:
    """`n` canonical prompts whose labels do not include `concept`."""
    rng = np.random.default_rng(seed)
    pred = concept_predicate(concept)
    count = 0
    while count < n:
        lab = random_labels(rng)
        if pred(lab):
            continue
        yield TEMPLATES[rng.integers(len(TEMPLATES))].format(
            colour=lab.colour, pattern=PATTERN_WORDS[lab.pattern][0], object=OBJECT_WORDS[lab.object][0]), lab
        count += 1


def sample_captions(n: int, seed: int) -> list[str]:
    """`n` canonical captions of random labels (any object, colour and pattern)."""
    rng = np.random.default_rng(seed)
    return [TEMPLATES[rng.integers(len(TEMPLATES))].format(
        colour=lab.colour, pattern=PATTERN_WORDS[lab.pattern][0], object=OBJECT_WORDS[lab.object][0])
        for lab in (random_labels(rng) for _ in range(n))]
