"""The loss terms of concept ablation (docs/design.md#the-method), each a pure function of tensors.

Noise predictions are NxCxHxW. `mask` arguments are per-row weights (1 = the row takes part);
every term is a masked mean over rows, and 0 when no row takes part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_row_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per row (N,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` over rows where `mask` > 0 (weighted); 0 (still in the graph) when none."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def match_model_based(eps_theta_target: torch.Tensor, eps_0_anchor: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """|| eps_theta(z_t, c*, t) - sg(eps_0(z_t, c, t)) ||^2: the target caption denoises like the anchor."""
    return masked_mean(per_row_mse(eps_theta_target, eps_0_anchor.detach()), mask)


def match_noise_based(eps_theta_target: torch.Tensor, noise: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """|| eps_theta(z_t, c*, t) - eps ||^2 on anchor images: the cheaper variant."""
    return masked_mean(per_row_mse(eps_theta_target, noise), mask)


def anchor_regularizer(eps_theta_anchor: torch.Tensor, noise: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """|| eps_theta(z_t, c, t) - eps ||^2: the anchor caption itself keeps working."""
    return masked_mean(per_row_mse(eps_theta_anchor, noise), mask)


def preservation(eps_theta: torch.Tensor, eps_0: torch.Tensor, clip_mask: torch.Tensor) -> torch.Tensor:
    """|| eps_theta(z_t, c_i, t) - sg(eps_0(z_t, c_i, t)) ||^2 on rows whose CLIP mask is 0."""
    return masked_mean(per_row_mse(eps_theta, eps_0.detach()), 1.0 - clip_mask.float())


def contrastive_margin(eps_theta_target: torch.Tensor, eps_0_anchor: torch.Tensor, eps_0_target: torch.Tensor,
                       margin: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """relu(margin + d(eps_theta(c*), eps_0(c)) - d(eps_theta(c*), eps_0(c*))), d = per-row MSE.

    This is MarginRankingLoss(x1 = d_to_target, x2 = d_to_anchor, y = 1): zero once the ablated
    prediction is closer to the anchor than to the original target by more than `margin`.
    """
    d_anchor = per_row_mse(eps_theta_target, eps_0_anchor.detach())
    d_target = per_row_mse(eps_theta_target, eps_0_target.detach())
    return masked_mean(F.relu(margin + d_anchor - d_target), mask)


def predicted_x0(z_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (z_t - sqrt(1 - a_t) * eps) / sqrt(a_t), with a_t of shape (N,)."""
    a = alphas_cumprod_t.to(z_t.dtype).view(-1, *([1] * (z_t.dim() - 1)))
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def adversarial_generator(fake_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-saturating GAN loss for the matcher: -log D(fake) = softplus(-logit)."""
    return masked_mean(F.softplus(-fake_logits.float().flatten()), mask)


def adversarial_discriminator(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCE with real = 1, fake = 0: softplus(-real) + softplus(fake), each a (masked) mean."""
    return (masked_mean(F.softplus(-real_logits.float().flatten()), mask)
            + masked_mean(F.softplus(fake_logits.float().flatten()), mask))
