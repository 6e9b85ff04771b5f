"""Tiny pipelines with random weights, built from configs, for tests and smoke runs: the toy world's
shape (`build_random_pipeline`), and the real families (`save_sd1_pipeline`, `save_sd2_pipeline`,
`save_sdxl_pipeline`, `save_vit_b32_clip`), saved as folders `load_pipeline` / `--clip` read."""
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


# --- tiny real-architecture fixtures: SD-1.x, SD-2.x (v-prediction), SDXL, open_clip ViT-B-32 -------
# Real model families at a few hundred thousand parameters (plus the 49,408-row token embeddings of
# the full CLIP vocabulary), 32 px, cross-attention only at 4x4 latents and in the mid block: one
# sample or training step takes well under a second on CPU, along the real checkpoints' code paths.

FIXTURE_SIZE = 32  # pixels; the VAE downsamples 4x to 8x8 latents
FULL_VOCAB = 49408
TEXT_WIDTH_SMALL = 32  # the full vocabulary keeps the text encoders tiny only at this width


def _sd_scheduler(cls_name: str = "DDIMScheduler", prediction_type: str = "epsilon"):
    import diffusers

    kwargs = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  steps_offset=1, prediction_type=prediction_type)
    if cls_name == "DDIMScheduler":
        kwargs.update(clip_sample=False, set_alpha_to_one=False)
    return getattr(diffusers, cls_name)(**kwargs)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=FIXTURE_SIZE,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4)


def _tiny_unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=FIXTURE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=cross_attention_dim, **extra)


def _clip_text_config(projection_dim: int | None = None, pad_token_id: int = 1):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    # eos = the real end-of-text id, so the pooled output is taken at the first end-of-text token
    return CLIPTextConfig(vocab_size=FULL_VOCAB, hidden_size=TEXT_WIDTH_SMALL, intermediate_size=2 * TEXT_WIDTH_SMALL,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=FULL_VOCAB - 2, eos_token_id=FULL_VOCAB - 1, pad_token_id=pad_token_id,
                          hidden_act="gelu", **extra)


def _save(pipe, path: str | Path) -> Path:
    from ..pipeline import quiet_libraries

    quiet_libraries()  # no per-component "Writing model shards" bars
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_sd1_pipeline(path: str | Path, seed: int = 0) -> Path:
    """SD-1.x: StableDiffusionPipeline, epsilon, one CLIPTextModel, the full CLIP tokenizer (77 tokens)."""
    import tempfile

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from .tokenizer import build_full_tokenizer

    torch.manual_seed(seed)
    tok = build_full_tokenizer(tempfile.mkdtemp(prefix="rayablate-tok-"))
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_text_config()), tokenizer=tok,
        unet=_tiny_unet(TEXT_WIDTH_SMALL, attention_head_dim=8), scheduler=_sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, path)


def save_sd2_pipeline(path: str | Path, seed: int = 0) -> Path:
    """SD-2.x style: v_prediction, per-block head dims and linear projections in the transformers,
    a tokenizer that pads with "!" as SD-2's does."""
    import tempfile

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from .tokenizer import build_full_tokenizer

    torch.manual_seed(seed)
    tok = build_full_tokenizer(tempfile.mkdtemp(prefix="rayablate-tok-"), pad_token="!")
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_text_config(pad_token_id=0)), tokenizer=tok,
        unet=_tiny_unet(TEXT_WIDTH_SMALL, attention_head_dim=(2, 4), use_linear_projection=True),
        scheduler=_sd_scheduler(prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, path)


SDXL_TIME_EMBED_DIM = 8


def save_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """SDXL: CLIPTextModel + CLIPTextModelWithProjection (their penultimate states concatenated), a
    `text_time` UNet (pooled embedding + 6 size/crop time ids) and the Euler scheduler."""
    import tempfile

    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import build_full_tokenizer

    torch.manual_seed(seed)
    tok = build_full_tokenizer(tempfile.mkdtemp(prefix="rayablate-tok-"))
    tok_2 = build_full_tokenizer(tempfile.mkdtemp(prefix="rayablate-tok-"), pad_token="!")
    proj = TEXT_WIDTH_SMALL
    unet = _tiny_unet(2 * TEXT_WIDTH_SMALL, attention_head_dim=(2, 4), use_linear_projection=True,
                      transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                      addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + proj)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection_dim=proj, pad_token_id=0)),
        tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=_sd_scheduler("EulerDiscreteScheduler"),
        add_watermarker=False)
    return _save(pipe, path)


def vit_b32_config(width: int | None = None, layers: int | None = None, text_width: int | None = None) -> dict:
    """open_clip's "ViT-B-32" config (kwargs of `open_clip.CLIP`): 224 px, 32 px patches, 77 tokens,
    49,408-token vocabulary. `width`/`layers`/`text_width` narrow it (None: the real sizes)."""
    import copy

    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-32"))
    if width:
        cfg["vision_cfg"]["width"] = width
        cfg["embed_dim"] = text_width or width
    if layers:
        cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = layers
    if text_width:
        cfg["text_cfg"]["width"] = text_width
        cfg["text_cfg"]["heads"] = max(2, text_width // 64)  # 64-wide heads, as ViT-B-32's 512 / 8
    return cfg


def save_vit_b32_clip(path: str | Path, seed: int = 0, width: int | None = None, layers: int | None = None,
                      text_width: int | None = None) -> Path:
    """An open_clip ViT-B-32 with random weights, saved as a CLIP folder `rayablate.clip.ClipScorer.load`
    reads: open_clip_config.json, open_clip_model.safetensors, and the full CLIP tokenizer (77 tokens)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from .tokenizer import build_full_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_full_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    cfg = vit_b32_config(width, layers, text_width)
    save_file(open_clip.CLIP(**cfg).state_dict(), str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    return path
