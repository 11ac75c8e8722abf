"""Gaussian diffusion: schedules against closed forms and pinned numbers, respacing,
the training loss, and the ancestral / DDIM samplers with guidance and temperature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from demar.config import ConfigError, validate
from demar.diffusion import DiffusionConfig, GaussianDiffusion, space_timesteps

T = 1000
S = 0.008


def cosine() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", num_timesteps=T))


def linear(num_timesteps: int = T) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(schedule="linear", num_timesteps=num_timesteps))


# ----------------------------------------------------------------------------- closed forms


def f_cos(u: float) -> float:
    return math.cos((u + S) / (1 + S) * math.pi / 2) ** 2


def abar_cosine(t: int) -> float:
    """IDDPM: abar = f(u)/f(0) at u = (t+1)/T (index t = 0 is one noising step)."""
    return f_cos((t + 1) / T) / f_cos(0.0)


def posterior(abar_t: float, abar_prev: float) -> tuple[float, float, float]:
    beta = 1 - abar_t / abar_prev
    var = beta * (1 - abar_prev) / (1 - abar_t)
    coef1 = beta * math.sqrt(abar_prev) / (1 - abar_t)
    coef2 = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar_t)
    return var, coef1, coef2


@pytest.mark.parametrize("t", [1, 2, 10, 250, 500, 900, 998])
def test_cosine_schedule_matches_closed_form(t: int) -> None:
    d = cosine()
    assert d.alphas_cumprod[t] == pytest.approx(abar_cosine(t), rel=1e-12)
    var, c1, c2 = posterior(abar_cosine(t), abar_cosine(t - 1))
    assert d.posterior_variance[t] == pytest.approx(var, rel=1e-9)
    assert d.posterior_log_variance_clipped[t] == pytest.approx(math.log(var), rel=1e-9)
    assert d.posterior_mean_coef1[t] == pytest.approx(c1, rel=1e-9)
    assert d.posterior_mean_coef2[t] == pytest.approx(c2, rel=1e-9)


def test_cosine_schedule_clips_only_the_last_beta_and_clips_log_variance_at_zero() -> None:
    d = cosine()
    assert d.betas[-1] == 0.999  # f(1) = 0 would give beta = 1
    assert (d.betas[:-1] < 0.999).all()
    assert d.alphas_cumprod[0] == pytest.approx(abar_cosine(0), rel=1e-12)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert d.posterior_mean_coef1[0] == pytest.approx(1.0) and d.posterior_mean_coef2[0] == 0.0


@pytest.mark.parametrize("num_timesteps", [1000, 500])
def test_linear_schedule_matches_closed_form(num_timesteps: int) -> None:
    d = linear(num_timesteps)
    scale = 1000 / num_timesteps
    betas = [scale * (1e-4 + (0.02 - 1e-4) * i / (num_timesteps - 1)) for i in range(num_timesteps)]
    for t in (1, 7, num_timesteps // 2, num_timesteps - 1):
        abar_t, abar_prev = math.prod(1 - b for b in betas[: t + 1]), math.prod(1 - b for b in betas[:t])
        assert d.betas[t] == pytest.approx(betas[t], rel=1e-12)
        assert d.alphas_cumprod[t] == pytest.approx(abar_t, rel=1e-10)
        var, c1, c2 = posterior(abar_t, abar_prev)
        assert d.posterior_variance[t] == pytest.approx(var, rel=1e-8)
        assert d.posterior_mean_coef1[t] == pytest.approx(c1, rel=1e-8)
        assert d.posterior_mean_coef2[t] == pytest.approx(c2, rel=1e-8)


def test_pinned_golden_numbers() -> None:
    """Computed once (ADM conventions); any drift of the schedules shows here."""
    c, lin = cosine(), linear()
    golden = {
        (c, "alphas_cumprod", 0): 0.999958715775178,
        (c, "alphas_cumprod", 499): 0.4938435904406382,
        (c, "alphas_cumprod", 999): 2.4287669070348567e-09,
        (c, "posterior_variance", 1): 2.178949614569182e-05,
        (c, "posterior_log_variance_clipped", 499): -5.764743433609203,
        (c, "posterior_mean_coef1", 499): 0.00437458822614554,
        (c, "posterior_mean_coef2", 499): 0.9953516194721715,
        (lin, "alphas_cumprod", 499): 0.07858724288177824,
        (lin, "alphas_cumprod", 999): 4.035829765375676e-05,
        (lin, "posterior_log_variance_clipped", 0): -9.81672513529567,
        (lin, "posterior_mean_coef2", 999): 0.9899486782675173,
    }
    for (d, name, t), value in golden.items():
        assert getattr(d, name)[t] == pytest.approx(value, rel=1e-12), (name, t)
    r = c.respace(100)
    assert r.betas[1] == pytest.approx(0.0006798400685055217, rel=1e-12)
    assert r.betas[-1] == pytest.approx(0.9999899991985922, rel=1e-12)


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_matches_adm() -> None:
    kept = space_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    assert kept == [round(j * 999 / 99) for j in range(100)]
    # Two sections (sizes 50 and 50); the 24.5 is rounded half to even, as ADM does.
    assert space_timesteps(100, [10, 5]) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]
    assert space_timesteps(10, 10) == list(range(10))
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_respace_keeps_alphas_cumprod_and_recomputes_betas() -> None:
    base = cosine()
    r = base.respace(100)
    kept = space_timesteps(T, 100)
    assert r.num_timesteps == 100 and r.timestep_map == kept
    np.testing.assert_allclose(r.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-9)
    prev = np.append(1.0, base.alphas_cumprod[kept][:-1])
    np.testing.assert_allclose(r.betas, 1 - base.alphas_cumprod[kept] / prev, rtol=1e-12)
    full = base.respace(T)
    np.testing.assert_allclose(full.betas, base.betas, rtol=1e-12)
    # Respacing twice composes the timestep maps.
    assert base.respace(100).respace(10).timestep_map == [kept[k] for k in space_timesteps(100, 10)]


# ----------------------------------------------------------------------------- forward process and loss


def test_q_sample_statistics() -> None:
    d = cosine()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((100_000, 1), 2.0)
    for step in (10, 500, 900):
        t = torch.full((100_000,), step)
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = d.alphas_cumprod[step]
        assert xt.mean().item() == pytest.approx(2 * math.sqrt(abar), abs=0.01)
        assert xt.std().item() == pytest.approx(math.sqrt(1 - abar), abs=0.01)


def test_vb_term_trains_only_the_variance_channels() -> None:
    d = cosine()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 5, 4, generator=g)
    t = torch.randint(0, T, (6, 5), generator=g)
    t[0, 0] = 0  # decoder NLL branch included
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(6, 5, 8, generator=g, requires_grad=True)
    terms = d.loss_terms(out, x0, d.q_sample(x0, t, noise), t, noise)
    terms.vb.sum().backward()
    assert torch.all(out.grad[..., :4] == 0)
    assert out.grad[..., 4:].abs().sum() > 0
    out.grad = None
    terms = d.loss_terms(out, x0, d.q_sample(x0, t, noise), t, noise)
    terms.mse.sum().backward()
    assert torch.all(out.grad[..., 4:] == 0) and out.grad[..., :4].abs().sum() > 0
    assert torch.allclose(terms.loss, terms.mse + terms.vb)
    assert terms.loss.shape == (6, 5)


def test_loss_vanishes_for_the_true_eps_and_posterior_variance() -> None:
    d = cosine()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, 3, dtype=torch.float64, generator=g)
    t = torch.randint(1, T, (64,), generator=g)
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    xt = d.q_sample(x0, t, noise)
    v = -torch.ones_like(x0)  # v = -1: log-variance = clipped posterior log-variance
    terms = d.loss_terms(torch.cat([noise, v], dim=-1), x0, xt, t, noise)
    assert terms.mse.abs().max().item() < 1e-20
    assert terms.vb.abs().max().item() < 1e-6
    # A wrong variance costs a positive KL.
    wrong = d.loss_terms(torch.cat([noise, -v], dim=-1), x0, xt, t, noise)
    assert (wrong.vb > 0).all()


def test_training_losses_draws_from_the_generator() -> None:
    d = cosine()
    x0 = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(3))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.1 * x, (t.unsqueeze(-1) / T - 0.5).expand_as(x)], dim=-1)

    a = d.training_losses(model, x0, generator=torch.Generator().manual_seed(7))
    b = d.training_losses(model, x0, generator=torch.Generator().manual_seed(7))
    c = d.training_losses(model, x0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.loss, b.loss) and not torch.equal(a.loss, c.loss)
    assert a.loss.shape == (4, 5)


def test_without_learn_sigma_the_loss_is_the_mse() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False))
    x0 = torch.randn(3, 2, 4)
    out = d.training_losses(lambda x, t: 0.5 * x, x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.loss, out.mse) and torch.all(out.vb == 0)
    with pytest.raises(ValueError):
        d.training_losses(lambda x, t: torch.cat([x, x], -1), x0)


# ----------------------------------------------------------------------------- sampling


def perfect_model(base: GaussianDiffusion, x_star: torch.Tensor):
    """The exact eps for data concentrated at ``x_star``, at ORIGINAL timesteps; v = 0."""
    abar = torch.from_numpy(base.alphas_cumprod)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].unsqueeze(-1).to(x.dtype)
        eps = (x - a.sqrt() * x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=-1)

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [1000, 50])
def test_perfect_model_recovers_the_data_point(sampler: str, steps: int) -> None:
    """Also checks that a respaced process calls the model with the original timesteps."""
    base = GaussianDiffusion.from_config(DiffusionConfig(sampler=sampler, ddim_eta=0.5))
    x_star = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    d = base if steps == T else base.respace(steps)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(5, 2, 3, dtype=torch.float64, generator=g)
    out = d.sample(perfect_model(base, x_star), noise, generator=g)
    torch.testing.assert_close(out, x_star.expand_as(out), atol=1e-6, rtol=0)


def linear_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    eps = 0.3 * x + 0.1 * torch.sin(t.unsqueeze(-1).to(x.dtype) + x)
    v = torch.tanh(x + t.unsqueeze(-1) / T)
    return torch.cat([eps, v], dim=-1)


def test_same_seed_same_samples() -> None:
    d = cosine().respace(20)
    noise = torch.randn(3, 4, 2)
    a = d.sample(linear_model, noise, generator=torch.Generator().manual_seed(5))
    b = d.sample(linear_model, noise, generator=torch.Generator().manual_seed(5))
    c = d.sample(linear_model, noise, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def halves_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model whose conditional and unconditional halves differ (rows [cond; uncond])."""
    half = x.shape[0] // 2
    sign = torch.cat([torch.ones(half), -torch.ones(half)]).view(-1, *([1] * (x.dim() - 1)))
    eps = 0.2 * x + 0.5 * sign
    v = 0.3 * sign * torch.ones_like(x)
    return torch.cat([eps, v], dim=-1)


def test_cfg_one_equals_the_unguided_path() -> None:
    d = cosine().respace(25)
    noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    guided = d.sample(halves_model, noise, cfg=1.0, guided=True, generator=torch.Generator().manual_seed(1))
    cond_only = d.sample(
        lambda x, t: halves_model(torch.cat([x, x]), torch.cat([t, t]))[: x.shape[0]],
        noise,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(guided, cond_only, atol=1e-6, rtol=1e-6)


def test_cfg_guides_eps_and_keeps_the_conditional_variance() -> None:
    d = cosine().respace(25)
    scale = 3.0
    noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))

    def by_hand(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = halves_model(torch.cat([x, x]), torch.cat([t, t]))
        cond, uncond = out.chunk(2)
        eps = uncond[..., :4] + scale * (cond[..., :4] - uncond[..., :4])
        return torch.cat([eps, cond[..., 4:]], dim=-1)

    guided = d.sample(halves_model, noise, cfg=scale, generator=torch.Generator().manual_seed(1))
    expected = d.sample(by_hand, noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(guided, expected, atol=1e-6, rtol=1e-6)
    unguided = d.sample(halves_model, torch.cat([noise, noise]), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(guided, unguided[:3], atol=1e-3)


def test_temperature_zero_follows_the_mean_path() -> None:
    d = cosine().respace(30)
    noise = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    a = d.sample(linear_model, noise, temperature=0.0, generator=torch.Generator().manual_seed(1))
    b = d.sample(linear_model, noise, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    x = noise
    for k in reversed(range(d.num_timesteps)):
        t = torch.full(x.shape[:-1], k)
        x = d.p_mean_variance(linear_model(x, d.original_timesteps(t)), x, t).mean
    torch.testing.assert_close(a, x)


def test_temperature_scales_only_the_per_step_noise() -> None:
    """With a model whose mean is linear in x and zero initial noise, x_0 is linear in temperature."""
    d = cosine().respace(30)

    def zero_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)

    zeros = torch.zeros(2, 3, 4, dtype=torch.float64)
    full = d.sample(zero_model, zeros, temperature=1.0, generator=torch.Generator().manual_seed(3))
    half = d.sample(zero_model, zeros, temperature=0.5, generator=torch.Generator().manual_seed(3))
    assert full.abs().max() > 0.1
    torch.testing.assert_close(half, 0.5 * full)


def test_ddim_eta_zero_is_deterministic_and_differs_from_ddpm() -> None:
    base = GaussianDiffusion.from_config(DiffusionConfig(sampler="ddim", ddim_eta=0.0)).respace(20)
    noise = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0))
    a = base.sample(linear_model, noise, generator=torch.Generator().manual_seed(1))
    b = base.sample(linear_model, noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    ddpm = cosine().respace(20).sample(linear_model, noise, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, ddpm)


def test_tables_follow_the_input_dtype() -> None:
    d = cosine()
    x0 = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0, 999])
    out = d.q_sample(x0, t, torch.zeros_like(x0))
    assert out.dtype == torch.float64
    assert out[1, 0].item() == pytest.approx(math.sqrt(d.alphas_cumprod[999]), rel=1e-12)
    assert d.q_sample(x0.float(), t, torch.zeros(2, 3)).dtype == torch.float32


# ----------------------------------------------------------------------------- config


def test_config_validation() -> None:
    assert validate(DiffusionConfig, None) == DiffusionConfig()
    for bad in (
        {"schedule": "quadratic"},
        {"num_timesteps": 1},
        {"ddim_eta": -0.1},
        {"max_beta": 1.0},
        {"unknown": 1},
        {"schedule": "linear", "num_timesteps": 10},  # last beta 2.0
    ):
        with pytest.raises(ConfigError):
            validate(DiffusionConfig, bad)


def test_clip_x0_bounds_sampling_but_not_the_training_loss():
    import torch

    from demar.diffusion import DiffusionConfig, GaussianDiffusion

    cfg = DiffusionConfig(schedule="cosine", num_timesteps=100, clip_x0=1.0)
    clipped = GaussianDiffusion.from_config(cfg).respace(10)
    free = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", num_timesteps=100)).respace(10)

    def bad_model(x, t):  # a large eps error, as a short training leaves at large t
        return torch.cat([torch.full_like(x, 3.0), torch.zeros_like(x)], dim=-1)

    noise = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(0))
    out_clipped = clipped.sample(bad_model, noise, temperature=0.0)
    out_free = free.sample(bad_model, noise, temperature=0.0)
    assert out_clipped.abs().max() <= 1.0 + 1e-5
    assert out_free.abs().max() > 10.0
    # The training loss ignores the clip: identical loss terms with and without it.
    x0 = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(1)) * 3
    t = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(2))
    eps = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(3))
    full_c = GaussianDiffusion.from_config(cfg)
    full_f = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", num_timesteps=100))
    x_t = full_f.q_sample(x0, t, eps)
    out = torch.randn(4, 6, 4, generator=torch.Generator().manual_seed(4))
    a, b = full_c.loss_terms(out, x0, x_t, t, eps), full_f.loss_terms(out, x0, x_t, t, eps)
    assert torch.equal(a.loss, b.loss)
