"""A tiny Stable Diffusion pipeline with random weights, built from configs: for tests and smoke runs."""
from __future__ import annotations

from pathlib import Path

import torch

from . import models
from .tokenizer import build_tokenizer


def build_random_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None):
    """A StableDiffusionPipeline shaped like the bundled toy one, with random weights."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.mkdtemp(prefix="rayablate-tok-"))
    tok = build_tokenizer(tok_dir, models.CONTEXT_LENGTH)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**models.vae_config()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**models.text_encoder_config(len(tok)))),
        tokenizer=tok,
        unet=UNet2DConditionModel(**models.unet_config()),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Build a random tiny pipeline and save it as a diffusers folder at `path`."""
    pipe = build_random_pipeline(seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_random_clip(path: str | Path, seed: int = 0) -> Path:
    """A toy-CLIP folder (open_clip config + safetensors + tokenizer) with random weights."""
    import json

    import open_clip
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path / "tokenizer", models.CONTEXT_LENGTH)
    torch.manual_seed(seed)
    cfg = models.clip_config(len(tok))
    save_file(open_clip.CLIP(**cfg).state_dict(), str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    return path
