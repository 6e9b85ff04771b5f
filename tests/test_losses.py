"""Each loss term against a value computed by hand on small tensors."""
import math

import pytest
import torch

from rayablate import losses


def t(*rows):
    """Rows of flat values as an Nx1x1xK tensor."""
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def test_match_model_based_is_mse_to_teacher_anchor_and_stops_gradient():
    student = t([1.0, 2.0], [0.0, 0.0]).requires_grad_()
    teacher = t([0.0, 0.0], [1.0, 1.0]).requires_grad_()
    loss = losses.match_model_based(student, teacher)
    # row 0: (1 + 4) / 2 = 2.5; row 1: (1 + 1) / 2 = 1.0; mean 1.75
    assert loss.item() == pytest.approx(1.75)
    loss.backward()
    assert teacher.grad is None  # sg(eps_0): no gradient reaches the frozen model's prediction
    assert student.grad is not None


def test_match_noise_based_and_anchor_regularizer_are_mse_to_noise():
    pred, noise = t([3.0, 1.0]), t([1.0, 1.0])
    assert losses.match_noise_based(pred, noise).item() == pytest.approx(2.0)  # (4 + 0) / 2
    assert losses.anchor_regularizer(pred, noise).item() == pytest.approx(2.0)


def test_masked_terms_use_only_masked_rows():
    pred, noise = t([3.0], [1.0]), t([1.0], [1.0])
    assert losses.match_noise_based(pred, noise, mask=torch.tensor([0, 1])).item() == pytest.approx(0.0)
    assert losses.match_noise_based(pred, noise, mask=torch.tensor([1, 0])).item() == pytest.approx(4.0)
    # no row selected: 0, not NaN
    assert losses.match_noise_based(pred, noise, mask=torch.tensor([0, 0])).item() == 0.0


def test_preservation_uses_rows_whose_clip_mask_is_zero():
    student = t([2.0], [5.0], [1.0])
    teacher = t([0.0], [0.0], [0.0])
    clip_mask = torch.tensor([1, 0, 0])  # row 0 is an ablation row: excluded
    assert losses.preservation(student, teacher, clip_mask).item() == pytest.approx((25.0 + 1.0) / 2)


def test_contrastive_margin_is_zero_when_anchor_closer_by_more_than_margin():
    student = t([0.0, 0.0])
    anchor = t([0.1, 0.0])    # d_anchor = 0.01 / 2 = 0.005
    target = t([1.0, 1.0])    # d_target = 1.0
    assert losses.contrastive_margin(student, anchor, target, margin=0.5).item() == 0.0


def test_contrastive_margin_is_positive_inside_the_margin_and_matches_margin_ranking_loss():
    student = t([0.0, 0.0], [0.0, 0.0])
    anchor = t([1.0, 1.0], [0.5, 0.5])   # d_anchor = 1.0, 0.25
    target = t([0.5, 0.5], [1.0, 1.0])   # d_target = 0.25, 1.0
    margin = 0.2
    # row 0: relu(0.2 + 1.0 - 0.25) = 0.95 ; row 1: relu(0.2 + 0.25 - 1.0) = 0
    got = losses.contrastive_margin(student, anchor, target, margin=margin)
    assert got.item() == pytest.approx(0.475)
    ref = torch.nn.MarginRankingLoss(margin=margin)(torch.tensor([0.25, 1.0]), torch.tensor([1.0, 0.25]),
                                                     torch.ones(2))
    assert got.item() == pytest.approx(ref.item())


def test_contrastive_margin_edge_exactly_at_margin_is_zero():
    student, anchor, target = t([0.0]), t([0.0]), t([math.sqrt(0.3)])  # d_anchor 0, d_target 0.3
    assert losses.contrastive_margin(student, anchor, target, margin=0.3).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.contrastive_margin(student, anchor, target, margin=0.31).item() == pytest.approx(0.01, abs=1e-6)


def test_adversarial_losses_are_bce_by_hand():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0])
    sp = lambda x: math.log1p(math.exp(x))  # softplus
    d = losses.adversarial_discriminator(real, fake)
    assert d.item() == pytest.approx((sp(-2.0) + sp(0.0)) / 2 + (sp(-1.0) + sp(0.0)) / 2)
    g = losses.adversarial_generator(fake)
    assert g.item() == pytest.approx((sp(1.0) + sp(0.0)) / 2)
    # matches torch's BCE-with-logits
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert d.item() == pytest.approx((bce(real, torch.ones(2)) + bce(fake, torch.zeros(2))).item())


def test_predicted_x0_inverts_the_forward_process():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    a = torch.tensor([0.9, 0.5, 0.1])
    zt = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(losses.predicted_x0(zt, eps, a), x0, atol=1e-5)


def test_discriminator_scores_one_logit_per_row():
    from rayablate.discriminator import LatentDiscriminator

    d = LatentDiscriminator(in_channels=8, width=16)
    out = d(torch.randn(5, 8, 8, 8), torch.tensor([0, 100, 500, 900, 999]))
    assert out.shape == (5,)
    assert torch.isfinite(out).all()
