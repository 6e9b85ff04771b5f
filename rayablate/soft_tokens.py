"""New, trainable token embeddings ("soft tokens") for a pipeline's text encoders.

The mechanism of textual inversion, shared by the concept-inversion attack (`rayablate.attack`)
and robust ablation's inner attacker (`rayablate.robust`): `num_vectors` new tokens are added to
copies of the pipeline's tokenizers, and while `installed(encoders)` is active each encoder's token
embedding maps those ids to trainable vectors (one set per encoder: SDXL has two) and every other
id to its own frozen row. No encoder weight changes, so the pipeline is left as it was.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
from torch import nn

TOKEN = "<ra-v{}>"


class _Extended(nn.Module):
    """An encoder's token embedding plus `vectors` for ids >= `first`."""

    def __init__(self, base: nn.Embedding, vectors: torch.Tensor, first: int):
        super().__init__()
        self.base, self.vectors, self.first = base, vectors, first
        self.weight = base.weight  # code that reads .weight (dtype, device) still works

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        emb = self.base(torch.where(new, torch.zeros_like(ids), ids))
        soft = self.vectors[(ids - self.first).clamp(0, len(self.vectors) - 1)].to(emb.dtype)
        return torch.where(new.unsqueeze(-1), soft, emb)


def _word_vectors(tokenizer, embedding: nn.Embedding, words: Sequence[str]) -> torch.Tensor | None:
    """The mean embedding of the tokens of `words` (None when they tokenize to nothing)."""
    ids = [i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids]
    if not ids:
        return None
    return embedding.weight.detach()[torch.tensor(ids)].float().mean(0)


class SoftTokens:
    """`num_vectors` new tokens for every text encoder of a pipeline (see the module docstring).

    `init`: "random" (normal, at the norm of the encoder's embeddings), or words whose mean token
    embedding (plus a little seeded noise, so vectors differ) each vector starts from.
    """

    def __init__(self, tokenizers: Sequence, encoders: Sequence[nn.Module], num_vectors: int,
                 init_words: Sequence[str] = (), seed: int = 0, device: torch.device | str = "cpu"):
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, not {num_vectors}")
        self.tokens = [TOKEN.format(i) for i in range(num_vectors)]
        self.tokenizers = []
        for tok in tokenizers:
            tok = copy.deepcopy(tok)
            tok.add_tokens(self.tokens)
            self.tokenizers.append(tok)
        encs = list(encoders)
        gen = torch.Generator().manual_seed(seed)
        self.firsts, vectors = [], []
        for tok, enc in zip(self.tokenizers, encs):
            emb = enc.get_input_embeddings()
            ids = tok.convert_tokens_to_ids(self.tokens)
            if ids != list(range(ids[0], ids[0] + num_vectors)):
                raise RuntimeError(f"the new tokens got non-contiguous ids {ids}")
            self.firsts.append(ids[0])
            scale = emb.weight.detach().float().norm(dim=-1).mean()
            noise = torch.randn(num_vectors, emb.embedding_dim, generator=gen)
            base = _word_vectors(tok, emb, init_words) if init_words else None
            v = (noise / noise.norm(dim=-1, keepdim=True) * scale if base is None
                 else base.expand(num_vectors, -1) + 0.01 * scale * noise / noise.norm(dim=-1, keepdim=True))
            vectors.append(nn.Parameter(v.clone().to(device)))
        self.vectors = nn.ParameterList(vectors)

    @classmethod
    def for_pipeline(cls, pipe, num_vectors: int, init_words: Sequence[str] = (), seed: int = 0,
                     device: torch.device | str = "cpu") -> "SoftTokens":
        from .pipeline import text_encoders

        toks = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
        return cls(toks, [m for _, m in text_encoders(pipe)], num_vectors, init_words, seed, device)

    @property
    def text(self) -> str:
        """The new tokens as prompt text, e.g. "<ra-v0> <ra-v1>"."""
        return " ".join(self.tokens)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.vectors)

    def tokenize(self, captions: Sequence[str], device) -> list[torch.Tensor]:
        return [tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device) for tok in self.tokenizers]

    @contextlib.contextmanager
    def installed(self, encoders: Sequence[nn.Module]):
        """While active, each encoder's token embedding also knows the new tokens."""
        old = [enc.get_input_embeddings() for enc in encoders]
        try:
            for enc, base, v, first in zip(encoders, old, self.vectors, self.firsts):
                enc.set_input_embeddings(_Extended(base, v, first))
            yield self
        finally:
            for enc, base in zip(encoders, old):
                enc.set_input_embeddings(base)

    @contextlib.contextmanager
    def in_pipeline(self, pipe):
        """While active, `pipe(prompt=...)` understands prompts with the new tokens."""
        from .pipeline import text_encoders

        names = [n for n in ("tokenizer", "tokenizer_2") if getattr(pipe, n, None) is not None]
        old = {n: getattr(pipe, n) for n in names}
        try:
            for n, tok in zip(names, self.tokenizers):
                setattr(pipe, n, tok)
            with torch.no_grad(), self.installed([m for _, m in text_encoders(pipe)]):
                yield pipe
        finally:
            for n, tok in old.items():
                setattr(pipe, n, tok)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"vectors.{i}": v.detach().float().cpu() for i, v in enumerate(self.vectors)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, v in enumerate(self.vectors):
                v.copy_(state[f"vectors.{i}"].to(v.device, v.dtype))


def denoising_loss(unet, z_t: torch.Tensor, t: torch.Tensor, cond, goal: torch.Tensor) -> torch.Tensor:
    """MSE of `unet`'s prediction for (z_t, t) under `cond` = (hidden states, added kwargs or None)
    against `goal`: the loss both soft-token optimisers (the attack, robust mode's inner attacker) step on."""
    h, add = cond
    dtype = unet.dtype
    if add is not None:
        add = {k: v.to(dtype) for k, v in add.items()}
    pred = unet(z_t.to(dtype), t, encoder_hidden_states=h.to(dtype), added_cond_kwargs=add, return_dict=False)[0]
    return (pred.float() - goal).pow(2).mean()
