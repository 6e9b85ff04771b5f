"""Text conditioning and the denoiser as one module: what the matcher trains and the teacher freezes.

`PromptEncoder` builds the UNet's conditioning from captions the way the pipeline does at sampling
time (SD 1.x/2.x: the last hidden state of one text encoder; SDXL: both encoders' penultimate
states, the pooled embedding and the size/crop time ids). `MatcherModule` wraps a UNet and its text
encoders so one optimizer (or one DeepSpeed engine) owns every trainable parameter of the matcher.
"""
from __future__ import annotations

import torch
from torch import nn


class PromptEncoder:
    """Captions -> the UNet's conditioning, as the pipeline builds it at sampling time (SD 1/2, SDXL)."""

    def __init__(self, pipe):
        self.tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
                           if t is not None]
        self.xl = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
        sample = pipe.unet.config.sample_size
        scale = getattr(pipe, "vae_scale_factor", 8)
        sizes = (sample, sample) if isinstance(sample, int) else tuple(sample)
        self.pixel_size = tuple(s * scale for s in sizes)

    @classmethod
    def of_parts(cls, tokenizers: list, xl: bool, pixel_size: tuple[int, int] = (1024, 1024)) -> "PromptEncoder":
        """An encoder from tokenizers alone, for a model whose UNet is not loaded (`pixel_size` only
        sets SDXL's time ids, which `encode`'s hidden states do not depend on)."""
        self = cls.__new__(cls)
        self.tokenizers, self.xl, self.pixel_size = list(tokenizers), xl, pixel_size
        return self

    def tokenize(self, captions: list[str], device) -> list[torch.Tensor]:
        return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device) for tok in self.tokenizers]

    def encode(self, encoders: list[nn.Module], ids: list[torch.Tensor]):
        """(encoder_hidden_states, added_cond_kwargs or None)."""
        if not self.xl:
            enc = encoders[0]
            return enc(ids[0])[0], None
        hidden, pooled = [], None
        for enc, i in zip(encoders, ids):
            out = enc(i, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        h, w = self.pixel_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=pooled.device, dtype=pooled.dtype).repeat(len(pooled), 1)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


class MatcherModule(nn.Module):
    """A denoiser (UNet + its text encoders) as one module, so one DeepSpeed engine wraps it.

    `forward` takes either token ids (text encoders run inside, for groups that train them) or
    precomputed conditioning.
    """

    def __init__(self, unet: nn.Module, encoders: dict[str, nn.Module], prompts: PromptEncoder):
        super().__init__()
        self.unet = unet
        self.text_encoders = nn.ModuleDict(encoders)
        self.prompts = prompts

    def forward(self, latents, timesteps, encoder_hidden_states=None, added_cond_kwargs=None, input_ids=None):
        if encoder_hidden_states is None:
            encoder_hidden_states, added_cond_kwargs = self.prompts.encode(list(self.text_encoders.values()), input_ids)
        dtype = self.unet.dtype
        if added_cond_kwargs is not None:
            added_cond_kwargs = {k: v.to(dtype) for k, v in added_cond_kwargs.items()}
        return self.unet(latents.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype),
                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
