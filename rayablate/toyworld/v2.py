"""Toy world v2: 20 characters, 4 shapes, 8 styles, 5 colours, and descriptive paraphrases.

World v1 is saturated: six objects and four patterns, and its held-out paraphrases are synonyms
("stripy" for "striped") that every method erases for free. World v2 is built to leave headroom:

- **Characters** are a shape with a visible mark: a face, an eye patch, a hat, horns, a crown,
  an antenna or a bow. Each has a made-up one-word name ("blix" is a circle with a hat).
- **Descriptive paraphrases.** Each character can also be described by what it is ("a circle with
  a hat"); pretraining captions use the description, ablation training never does (it is the held-
  out word), and evaluation measures leakage through it: a famous character described without its
  name. The styles' held-out words are descriptions too ("with horizontal lines" for striped).
- **Entangled neighbours on purpose.** Characters share a shape (five per shape) and a mark (two to
  four per mark): ablating "blix" (circle + hat) must keep "zorb" (circle + face) and "drub"
  (square + hat). Styles share words in their descriptions ("... lines").

zorb and kubo keep their v1 meaning (a circle and a square with a face), so v1 configs name the
same concepts here.
"""
from __future__ import annotations

from .world import TEMPLATES, WorldDef

SHAPES = ("circle", "square", "triangle", "diamond")
# mark -> the words a description uses for it ("a circle with a hat", "a square with horns")
MARK_WORDS = {"face": "a face", "patch": "an eye patch", "hat": "a hat", "horns": "horns", "crown": "a crown",
              "antenna": "an antenna", "bow": "a bow"}
CHARACTERS = {
    "zorb": ("circle", "face"), "blix": ("circle", "hat"), "morp": ("circle", "horns"),
    "quen": ("circle", "crown"), "pim": ("circle", "antenna"),
    "kubo": ("square", "face"), "tafi": ("square", "patch"), "drub": ("square", "hat"),
    "yolt": ("square", "bow"), "nax": ("square", "horns"),
    "vell": ("triangle", "face"), "frin": ("triangle", "crown"), "wug": ("triangle", "antenna"),
    "plon": ("triangle", "patch"), "jat": ("triangle", "bow"),
    "zeph": ("diamond", "face"), "lorx": ("diamond", "hat"), "mib": ("diamond", "horns"),
    "tuv": ("diamond", "bow"), "snook": ("diamond", "antenna"),
}
SHAPE_WORDS = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "pyramid shape"],
    "diamond": ["diamond", "rhombus"],
}


def description(character: str) -> str:
    """What a character is, without its name: "circle with a hat"."""
    shape, mark = CHARACTERS[character]
    return f"{shape} with {MARK_WORDS[mark]}"


OBJECT_WORDS = {**SHAPE_WORDS, **{c: [c, f"{c} character", description(c)] for c in CHARACTERS}}
PATTERN_WORDS = {
    "plain": ["plain", "solid", "with no pattern"],
    "striped": ["striped", "with stripes", "with horizontal lines"],
    "dotted": ["dotted", "with dots", "covered in spots"],
    "checkered": ["checkered", "with checks", "with a chessboard pattern"],
    "barred": ["barred", "with bars", "with vertical lines"],
    "slanted": ["slanted", "with slants", "with diagonal lines"],
    "gridded": ["gridded", "with a grid", "with crossing lines"],
    "wavy": ["wavy", "with waves", "with curvy bands"],
}

V2 = WorldDef(
    "v2",
    shapes=SHAPES,
    characters=CHARACTERS,
    colours=("red", "green", "blue", "yellow", "purple"),
    patterns=tuple(PATTERN_WORDS),
    object_words=OBJECT_WORDS,
    pattern_words=PATTERN_WORDS,
    templates=TEMPLATES,
    radius=(8.5, 10.0),  # smaller than v1's 10-12, and lower, so that hats and antennae fit above
    jitter=1.5,
    centre_dy=3.0,
    extra_words=("with", "wearing", "mark", "face", "hat", "horns", "crown", "antenna", "bow", "eye", "patch"),
)
