"""Denoising head: hand-made loss values, fusion weights, gradient isolation, noise injection."""

from __future__ import annotations

import math

import pytest
import torch

from demar.denoising_head import DenoisingHead, DenoisingHeadConfig, NoiseInjectionConfig, NoiseInjector
from demar.diffusion import DiffusionConfig, GaussianDiffusion


def hand_made_head(refine_loss: str = "l2") -> DenoisingHead:
    """d = 2, D = 1, hidden 1: y = x~ + [1, 0] * SiLU(z); scores (s_x, s_y) = (0.5, 2.0)."""
    head = DenoisingHead(2, 1, DenoisingHeadConfig(hidden_dim=1, refine_loss=refine_loss))
    with torch.no_grad():
        head.refine_in.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))  # picks z
        head.refine_in.bias.zero_()
        head.refine_out.weight.copy_(torch.tensor([[1.0], [0.0]]))
        head.refine_out.bias.zero_()
        head.assess_in.weight.zero_()
        head.assess_in.bias.zero_()
        head.assess_out.weight.zero_()
        head.assess_out.bias.copy_(torch.tensor([0.5, 2.0]))
    return head


def test_loss_values_on_hand_made_example():
    head = hand_made_head()
    x_noisy = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [1, 2, 2]
    target = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    z = torch.tensor([[[0.0], [2.0]]])
    silu2 = 2.0 / (1.0 + math.exp(-2.0))
    out = head(x_noisy, z)
    expected_y = torch.tensor([[[1.0, 0.0], [silu2, 2.0]]])
    torch.testing.assert_close(out.refined, expected_y)
    loss = head.loss(x_noisy, z, target)
    # eq. 3: ||y - x||_2 per token
    ref = torch.tensor([[1.0, math.sqrt(silu2**2 + 1.0)]])
    torch.testing.assert_close(loss.refinement, ref)
    # eq. 5-6: c_x = cos(x~, x), c_y = cos(y, x); loss |0.5 - c_x| + |2 - c_y|
    c_x = torch.tensor([1 / math.sqrt(2), 1.0])
    c_y = torch.tensor([1 / math.sqrt(2), 2.0 / math.sqrt(silu2**2 + 4.0)])
    torch.testing.assert_close(loss.assessment, ((0.5 - c_x).abs() + (2.0 - c_y).abs()).unsqueeze(0))
    # l1 variant: sum of absolute differences per token
    l1 = hand_made_head("l1").loss(x_noisy, z, target)
    torch.testing.assert_close(l1.refinement, torch.tensor([[1.0, silu2 + 1.0]]))


def test_fusion_weights_positive_and_sum_to_one():
    head = DenoisingHead(4, 8, DenoisingHeadConfig())
    scores = torch.tensor([[0.3, 0.7], [-1.0, 2.0], [-1.0, -3.0], [5.0, 0.0], [0.0, 0.0]])
    w = head.fusion_weights(scores)
    assert torch.all(w > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    torch.testing.assert_close(w[0], torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(w[2], torch.tensor([0.5, 0.5]))  # both clamped to eps
    # refine() is the convex combination of x and y with those weights
    fixed = hand_made_head()
    x = torch.randn(3, 5, 2)
    z = torch.randn(3, 5, 1)
    y = fixed(x, z).refined
    torch.testing.assert_close(fixed.refine(x, z), 0.2 * x + 0.8 * y)  # (0.5, 2.0) / 2.5


def test_random_scores_give_convex_fusion():
    head = DenoisingHead(4, 8, DenoisingHeadConfig())
    torch.nn.init.normal_(head.assess_out.weight, std=3.0)
    x, z = torch.randn(2, 50, 4), torch.randn(2, 50, 8)
    w = head.fusion_weights(head(x, z).scores)
    assert torch.all(w > 0) and torch.all(w < 1)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 50))


def test_assessment_loss_does_not_train_refinement_branch():
    head = DenoisingHead(4, 8, DenoisingHeadConfig(hidden_dim=16))
    torch.nn.init.normal_(head.refine_out.weight)  # non-zero so y depends on W1
    x_noisy, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    z = torch.randn(2, 6, 8, requires_grad=True)
    head.loss(x_noisy, z, target).assessment.mean().backward()
    for p in (head.refine_in.weight, head.refine_in.bias, head.refine_out.weight, head.refine_out.bias):
        assert p.grad is None or torch.all(p.grad == 0)
    assert head.assess_in.weight.grad.abs().sum() > 0 and head.assess_out.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0  # the backbone still learns from the assessment loss
    head.zero_grad()
    head.loss(x_noisy, z, target).refinement.mean().backward()
    assert head.refine_in.weight.grad.abs().sum() > 0
    assert head.assess_in.weight.grad is None or torch.all(head.assess_in.weight.grad == 0)


def test_untrained_refinement_is_identity():
    head = DenoisingHead(4, 8, DenoisingHeadConfig())
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(head(x, torch.randn(2, 3, 8)).refined, x)


@pytest.mark.parametrize("distribution", ["uniform", "uniform_per_image"])
def test_noise_injection_matches_schedule(distribution):
    diff_cfg = DiffusionConfig()
    inj = NoiseInjector(NoiseInjectionConfig(max_step=3, distribution=distribution), diff_cfg)
    x = torch.ones(64, 32, 1)
    out = inj(x, torch.Generator().manual_seed(0))
    abar = GaussianDiffusion.from_config(diff_cfg).alphas_cumprod
    # with the same draws: recover s from the stream and compare against q_sample by hand
    g = torch.Generator().manual_seed(0)
    shape = (64, 32) if distribution == "uniform" else (64, 1)
    s = (torch.rand(shape, generator=g, dtype=torch.float64) * 4).long().expand(64, 32)
    eps = torch.randn(64, 32, 1, generator=g)
    a = torch.from_numpy(abar).float()[s].unsqueeze(-1)
    torch.testing.assert_close(out, a.sqrt() * x + (1 - a).sqrt() * eps)
    assert set(s.unique().tolist()) == {0, 1, 2, 3}
    # zero max_step: s = 0 only, the smallest noise of the schedule
    inj0 = NoiseInjector(NoiseInjectionConfig(max_step=0), diff_cfg)
    noisy = inj0(x, torch.Generator().manual_seed(1))
    assert (noisy - x).abs().max() < 0.1


def test_noise_injection_schedule_override_and_bounds():
    diff_cfg = DiffusionConfig(schedule="cosine")
    inj = NoiseInjector(NoiseInjectionConfig(schedule="linear"), diff_cfg)
    assert inj.process.betas[0] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="max_step"):
        NoiseInjector(NoiseInjectionConfig(max_step=1000), diff_cfg)
