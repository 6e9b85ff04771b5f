"""A small convolutional discriminator on predicted clean latents x0_hat."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class LatentDiscriminator(nn.Module):
    """Scores latents (NxCxHxW, any H and W >= 4): a logit per row, high = "made by the frozen model".

    Spectral norm keeps it from overpowering the matcher: the adversarial term is a gentle,
    distribution-level signal on top of the per-sample match.
    """

    def __init__(self, in_channels: int = 4, width: int = 64, timestep_conditioned: bool = True):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(in_channels, w, 3, padding=1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * w, 2 * w, 3, padding=1)), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.t_embed = nn.Embedding(10, 2 * w) if timestep_conditioned else None
        self.head = spectral_norm(nn.Linear(2 * w, 1))

    def forward(self, x0_hat: torch.Tensor, timesteps: torch.Tensor | None = None,
                num_train_timesteps: int = 1000) -> torch.Tensor:
        h = self.body(x0_hat)
        if self.t_embed is not None and timesteps is not None:
            bucket = (timesteps.long() * 10 // num_train_timesteps).clamp(0, 9)
            h = h + self.t_embed(bucket)
        return self.head(h).squeeze(-1)
