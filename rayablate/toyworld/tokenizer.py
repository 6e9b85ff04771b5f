"""A reduced CLIP BPE tokenizer for the toy world, derived from open_clip's shipped vocabulary.

The full CLIP vocabulary has 49,408 tokens; a token embedding over it would dominate the
bundled weights. We keep the 512 byte-level base tokens (so any text still tokenizes), the
merges that fire when the full BPE tokenizes the world's words (so those words tokenize
exactly as the full tokenizer would split them), and the two special tokens, last, so that
the end-of-text id is the largest id (open_clip's argmax pooling relies on that).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from .world import vocabulary_words


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _full_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    byte_encoder = _bytes_to_unicode()
    fired: set[tuple[str, str]] = set()
    for w in words or vocabulary_words():
        for piece in w.lower().replace(",", " , ").split():
            fired |= _fired_merges(piece, ranks, byte_encoder)
    kept = [m for m in merges if m in fired]  # keep the original rank order
    base = list(byte_encoder.values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in kept] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in kept) + "\n", encoding="utf-8")
    return out


def build_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 24):
    """A transformers CLIPTokenizer over the reduced vocabulary, saved in `out_dir`."""
    from transformers import CLIPTokenizer

    out = write_reduced_vocabulary(out_dir)
    vocab = json.loads((out / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (out / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.save_pretrained(out)
    return tok
