"""Architectures of the toy world's models: attribute probe, tiny CLIP, tiny Stable Diffusion parts."""
from __future__ import annotations

import torch
from torch import nn

from .world import ATTRIBUTES, IMAGE_SIZE, V1, WorldDef

TEXT_WIDTH = 64
# 32x32x3 images become 8x8x8 latents: 8 channels, since 4 blurred the 4-pixel patterns.
LATENT_CHANNELS = 8
CONTEXT_LENGTH = 24


class AttributeProbe(nn.Module):
    """Classifies a render's object, colour and pattern, plus whether it is a valid render at all.

    The `valid` head is trained against noise, blurs, blends and degraded renders: a probe
    trained only on clean renders answers confidently on garbage, which would count every
    failed sample as some concept.
    """

    def __init__(self, width: int = 32, world: WorldDef = V1):
        super().__init__()
        self.heads = {a: len(world.values(a)) for a in ATTRIBUTES} | {"valid": 2}
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 8
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out = nn.ModuleDict({k: nn.Linear(4 * w, n) for k, n in self.heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """`images`: Nx3xHxW in [0, 1]. Returns logits per head."""
        h = self.features(images * 2.0 - 1.0)
        return {k: head(h) for k, head in self.out.items()}


def clip_config(vocab_size: int) -> dict:
    """open_clip model config of the tiny CLIP (kwargs of `open_clip.CLIP`)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": TEXT_WIDTH, "heads": 4,
                     "layers": 2, "mlp_ratio": 2.0},
    }


def vae_config() -> dict:
    # Sized for 2 CPU cores: ~0.5 s per step at batch 32 on one thread.
    return dict(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def unet_config() -> dict:
    # Cross-attention at 4x4 and in the mid block only: ~0.7 s per step at batch 64 on one thread.
    return dict(
        sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=16,
    )


def text_encoder_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
