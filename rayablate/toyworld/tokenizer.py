"""CLIP BPE tokenizers built from open_clip's shipped vocabulary: reduced (the toy world) or full.

The full CLIP vocabulary has 49,408 tokens; a token embedding over it would dominate the
bundled weights. We keep the 512 byte-level base tokens (so any text still tokenizes), the
merges that fire when the full BPE tokenizes the world's words (so those words tokenize
exactly as the full tokenizer would split them), and the two special tokens, last, so that
the end-of-text id is the largest id (open_clip's argmax pooling relies on that).

`build_full_tokenizer` keeps every merge: the 49,408-token vocabulary of Stable Diffusion's CLIP
text encoders, for the tiny real-architecture fixtures (`toyworld/tiny.py`).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from .world import V1, WorldDef


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe_path() -> Path:
    import open_clip.tokenizer as oct

    return Path(oct.default_bpe())


def _full_merges() -> list[tuple[str, str]]:
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]


def _fired_merges(word: str, ranks: dict[tuple[str, str], int], byte_encoder: dict[int, str]) -> set[tuple[str, str]]:
    """The merges the full BPE applies to one word."""
    symbols = [byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] = symbols[-1] + "</w>"
    fired = set()
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        fired.add(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return fired


def write_reduced_vocabulary(out_dir: str | os.PathLike, words: list[str] | None = None) -> Path:
    """Write vocab.json and merges.txt of a reduced CLIP BPE into `out_dir`."""
    merges = _full_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    byte_encoder = _bytes_to_unicode()
    fired: set[tuple[str, str]] = set()
    for w in words or V1.vocabulary_words():
        for piece in w.lower().replace(",", " , ").split():
            fired |= _fired_merges(piece, ranks, byte_encoder)
    return _write_vocabulary(out_dir, [m for m in merges if m in fired])  # keep the original rank order


def write_full_vocabulary(out_dir: str | os.PathLike) -> Path:
    """Write vocab.json and merges.txt of the full CLIP BPE (49,408 tokens) into `out_dir`."""
    return _write_vocabulary(out_dir, _full_merges())


def _write_vocabulary(out_dir: str | os.PathLike, merges: list[tuple[str, str]]) -> Path:
    """The byte tokens, their end-of-word forms, one token per merge (in rank order), then the two
    special tokens: the layout (and ids) of open_clip's SimpleTokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return out


def build_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 24, world: WorldDef = V1):
    """A transformers CLIPTokenizer over the reduced vocabulary of `world`'s words, saved in `out_dir`."""
    return _saved_tokenizer(write_reduced_vocabulary(out_dir, world.vocabulary_words()), model_max_length)


def build_full_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer over the full CLIP vocabulary, saved in `out_dir`. SD-1.x pads
    with the end-of-text token; SD-2.x and SDXL's second tokenizer pad with "!" (id 0)."""
    return _saved_tokenizer(write_full_vocabulary(out_dir), model_max_length, pad_token)


def _saved_tokenizer(out: Path, model_max_length: int, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    vocab = json.loads((out / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (out / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)
    tok.save_pretrained(out)
    return tok
