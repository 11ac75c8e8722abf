"""Gaussian diffusion on token vectors: schedules, training loss, respacing and sampling.

The conventions are those of ADM / IDDPM, which MAR's diffusion loss uses and
whose numbers the paper's results depend on:

- timesteps are indexed ``t = 0 .. T-1``; ``t = 0`` is the first noising step,
  ``alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])``;
- all schedule constants are float64 arrays, moved to the device and dtype of
  the inputs when used (cached per device and dtype);
- the model predicts eps (DDPM eq. 11) and, with ``learn_sigma``, a second set of
  ``d`` channels ``v`` in [-1, 1] interpolating the log-variance between the
  posterior variance and beta_t (IDDPM eq. 15);
- training loss per token: ``mse`` (mean over the token dimension of
  ``(eps - eps_theta)^2``, DDPM eq. 14) ``+ vb`` (IDDPM's L_vlb term in bits,
  trained through the variance channels only), as in MAR, unscaled;
- respacing (IDDPM section 4) keeps a subset of timesteps, recomputes betas from
  the kept ``alphas_cumprod`` and calls the model with the original timesteps.

Tensors are channel-last: tokens ``[..., d]`` with one timestep per token ``t [...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from demar.config import StrictConfig

__all__ = [
    "DiffusionConfig",
    "DiffusionLoss",
    "GaussianDiffusion",
    "MeanVariance",
    "ModelFn",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "is_guided",
    "linear_betas",
    "normal_kl",
    "randn",
    "space_timesteps",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(x_t [..., d], t [...]) -> [..., 2d]`` (``[..., d]`` without learn_sigma);
``t`` holds the ORIGINAL (un-respaced) timesteps."""


def is_guided(cfg: float) -> bool:
    """Whether guidance scale ``cfg`` needs the doubled ``[conditional; null context]`` batch: any scale but 1."""
    return cfg != 1.0


class DiffusionConfig(StrictConfig):
    """Hyperparameters of the Gaussian diffusion of a diffusion head.

    Attributes:
        schedule: beta schedule, ``"cosine"`` (IDDPM, MAR's choice) or ``"linear"`` (DDPM).
        num_timesteps: number of training timesteps T (default 1000).
        learn_sigma: the model also outputs variance interpolation channels (IDDPM eq. 15)
            and is trained with the VB term (default True, as MAR).
        fixed_variance: the reverse variance when ``learn_sigma`` is off: ``"large"``
            (beta_t, ADM's default) or ``"small"`` (the posterior variance).
        sampler: reverse process, ``"ddpm"`` (ancestral, MAR) or ``"ddim"``.
        ddim_eta: DDIM's eta (0 = deterministic), used when ``sampler == "ddim"``.
        cosine_s: offset s of the cosine schedule (IDDPM eq. 17; 0.008).
        max_beta: upper clip of cosine-schedule betas (0.999).
        linear_beta_start: first beta of the linear schedule at T = 1000 (1e-4), scaled by 1000 / T.
        linear_beta_end: last beta of the linear schedule at T = 1000 (0.02), scaled by 1000 / T.
        clip_x0: when set, the x_0 predicted during sampling is clamped to ``[-clip_x0, clip_x0]``
            (ADM's ``clip_denoised``); ``None`` keeps MAR's unclipped sampling (default None).
            Short trainings leave eps errors at large t that 1/sqrt(abar_T) amplifies; a clip
            bounds them.
    """

    schedule: Literal["linear", "cosine"] = "cosine"
    num_timesteps: int = Field(1000, ge=2)
    learn_sigma: bool = True
    fixed_variance: Literal["large", "small"] = "large"
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    ddim_eta: float = Field(0.0, ge=0.0)
    cosine_s: float = Field(0.008, ge=0.0)
    max_beta: float = Field(0.999, gt=0.0, lt=1.0)
    linear_beta_start: float = Field(1e-4, gt=0.0)
    linear_beta_end: float = Field(0.02, gt=0.0)
    clip_x0: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _check_linear(self) -> DiffusionConfig:
        if self.linear_beta_start > self.linear_beta_end:
            raise ValueError("linear_beta_start must not exceed linear_beta_end")
        if self.schedule == "linear" and self.linear_beta_end * 1000 / self.num_timesteps >= 1:
            raise ValueError(
                f"linear schedule with num_timesteps={self.num_timesteps} gives a last beta "
                f"{self.linear_beta_end * 1000 / self.num_timesteps:g} >= 1; use more timesteps"
            )
        return self


# ----------------------------------------------------------------------------- schedules


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule, scaled to T steps as ADM does (float64 ``[T]``).

    Args:
        num_timesteps: T.
        beta_start: first beta at T = 1000 (default 1e-4); the used value is ``beta_start * 1000 / T``.
        beta_end: last beta at T = 1000 (default 0.02); the used value is ``beta_end * 1000 / T``.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM's cosine schedule (eq. 17): ``abar(u) = f(u) / f(0)``, ``f(u) = cos^2((u + s) / (1 + s) * pi/2)``.

    ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta)`` for ``t = 0 .. T-1`` (IDDPM
    section 3.2), so that without clipping ``alphas_cumprod[t] = f((t+1)/T) / f(0)``.

    Args:
        num_timesteps: T.
        s: the small offset s (default 0.008).
        max_beta: clip of the betas near t = T (default 0.999).
    """

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return np.asarray(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: int | Sequence[int]) -> list[int]:
    """ADM's ``space_timesteps``: which of ``num_timesteps`` steps a respaced process keeps.

    The original range is cut into ``len(section_counts)`` equal sections; section
    ``i`` keeps ``section_counts[i]`` steps spaced evenly (rounded, first and last
    included). With one integer ``k`` (MAR's ``"100"``) the kept steps are
    ``round(j * (T - 1) / (k - 1))``, ``j = 0 .. k-1``.

    Args:
        num_timesteps: the original number of steps T.
        section_counts: steps to keep, as one integer or a count per section.

    Returns:
        The sorted kept timesteps.
    """
    counts = [section_counts] if isinstance(section_counts, int) else list(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} steps of a section of {size} (num_timesteps={num_timesteps})")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Accumulated float position, rounded half to even, exactly as ADM does.
        pos = 0.0
        for _ in range(count):
            kept.add(start + round(pos))
            pos += stride
        start += size
    return sorted(kept)


# ----------------------------------------------------------------------------- small math


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Phi used by ADM (kept: MAR's VB numbers use it).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """Log-probability (nats) of ``x`` under a Gaussian integrated over bins of ``bin_width``.

    This is DDPM's discrete decoder (eq. 13), written for 8-bit data in [-1, 1]: the
    outermost bins (``x < -0.999`` / ``x > 0.999``) extend to infinity. MAR applies it
    unchanged to latent tokens at ``t = 0``; we keep that quirk because the VB term,
    and through it the learned variance at the last step, depends on it.

    Args:
        x: targets ``[...]``.
        means: Gaussian means, same shape.
        log_scales: log standard deviations, same shape.
        bin_width: width of one bin (default ``2/255``).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + bin_width / 2))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def randn(
    shape: Sequence[int], *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise from ``generator`` (global RNG if None), placed on ``device``.

    A generator on another device type (e.g. a CPU generator for CUDA tensors) draws on
    its own device and the result is moved, so a run is reproducible from one seed.

    Args:
        shape: output shape.
        generator: the random stream (default None: torch's global RNG).
        device: device of the result.
        dtype: dtype of the result.
    """
    if generator is not None and generator.device.type != torch.device(device).type:
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _randint(
    high: int, shape: Sequence[int], *, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    if generator is not None and generator.device.type != torch.device(device).type:
        return torch.randint(0, high, tuple(shape), generator=generator, device=generator.device).to(device)
    return torch.randint(0, high, tuple(shape), generator=generator, device=device)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MeanVariance:
    """The reverse step p(x_{t-1} | x_t) a model output implies (all ``[..., d]``).

    Attributes:
        mean: mu_theta(x_t, t).
        variance: Sigma_theta(x_t, t) (diagonal).
        log_variance: its log.
        pred_x0: the x_0 implied by the predicted eps.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


@dataclass(frozen=True)
class DiffusionLoss:
    """Per-token training loss terms (all of shape ``[...]``, one value per token).

    Attributes:
        loss: ``mse + vb`` (just ``mse`` without learn_sigma).
        mse: mean over the token dimension of ``(eps - eps_theta)^2``.
        vb: the VB term in bits (KL of the true posterior vs the model's reverse step;
            decoder NLL at ``t = 0``); zeros without learn_sigma.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor


# ----------------------------------------------------------------------------- the diffusion


class GaussianDiffusion:
    """A Gaussian diffusion process over ``len(betas)`` steps (ADM conventions).

    Args:
        betas: float64 ``[T]`` betas in (0, 1].
        learn_sigma: model outputs have ``2d`` channels (eps, v) (default True).
        fixed_variance: reverse variance without learn_sigma, ``"large"`` or ``"small"`` (default ``"large"``).
        sampler: ``"ddpm"`` (default) or ``"ddim"``.
        ddim_eta: DDIM's eta (default 0.0).
        timestep_map: original timestep of each of these steps (default: ``0 .. T-1``);
            set by :meth:`respace`.
    """

    _TABLES = (
        "betas",
        "log_betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "fixed_variance_values",
        "fixed_log_variance_values",
    )

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        *,
        learn_sigma: bool = True,
        fixed_variance: Literal["large", "small"] = "large",
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        ddim_eta: float = 0.0,
        timestep_map: Sequence[int] | None = None,
        clip_x0: float | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D array of at least 2 values")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self.sampler = sampler
        self.ddim_eta = float(ddim_eta)
        self.clip_x0 = clip_x0
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else [int(t) for t in timestep_map]
        self._compiled_steps: dict[str, Callable[..., torch.Tensor]] = {}
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per step")

        # q(x_t | x_0) (DDPM eq. 4): abar_t = prod_{s<=t} alpha_s, alpha_s = 1 - beta_s.
        self.betas = betas
        self.log_betas = np.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # x_0 from eps (inverse of DDPM eq. 4 with x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps).
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # Posterior q(x_{t-1} | x_t, x_0) = N(mu~, beta~) (DDPM eqs. 6-7, IDDPM eqs. 10-11):
        #   beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        #   mu~_t   = [beta_t sqrt(abar_{t-1}) / (1 - abar_t)] x_0 + [(1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)] x_t
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: its log is clipped to beta~_1 (ADM).
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Fixed reverse variances (DDPM section 3.2): "large" = beta_t with its first value
        # replaced by beta~_1 (ADM, for a better decoder likelihood); "small" = beta~_t.
        if fixed_variance == "large":
            self.fixed_variance_values = np.append(self.posterior_variance[1], betas[1:])
            self.fixed_log_variance_values = np.log(self.fixed_variance_values)
        else:
            self.fixed_variance_values = self.posterior_variance
            self.fixed_log_variance_values = self.posterior_log_variance_clipped

        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        """The T-step training diffusion described by ``cfg``."""
        if cfg.schedule == "cosine":
            betas = cosine_betas(cfg.num_timesteps, cfg.cosine_s, cfg.max_beta)
        else:
            betas = linear_betas(cfg.num_timesteps, cfg.linear_beta_start, cfg.linear_beta_end)
        return cls(
            betas,
            learn_sigma=cfg.learn_sigma,
            fixed_variance=cfg.fixed_variance,
            sampler=cfg.sampler,
            ddim_eta=cfg.ddim_eta,
            clip_x0=cfg.clip_x0,
        )

    # ------------------------------------------------------------------ helpers

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            if name == "timestep_map":
                self._cache[key] = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            else:
                # float64 -> dtype on the host, then one copy to the device (ADM casts the same way).
                self._cache[key] = torch.from_numpy(getattr(self, name)).to(dtype).to(device)
        return self._cache[key]

    def _build_tables(self, device: torch.device, dtype: torch.dtype) -> None:
        """Every constant table on ``device`` in ``dtype`` (and the timestep map), built now."""
        for name in self._TABLES:
            self._table(name, device, dtype)
        self._table("timestep_map", device, torch.long)

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as ``[..., 1]`` in ``like``'s device and dtype (broadcasts over the token dim)."""
        return self._table(name, like.device, like.dtype)[t].unsqueeze(-1)

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map step indices of this (possibly respaced) process to the original timesteps."""
        return self._table("timestep_map", t.device, torch.long)[t]

    @property
    def output_channels_factor(self) -> int:
        """Model output channels per token channel: 2 with learn_sigma, else 1."""
        return 2 if self.learn_sigma else 1

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4).

        Args:
            x0: clean tokens ``[..., d]``.
            t: step indices ``[...]`` (long).
            noise: eps ``[..., d]``.
        """
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

        Args:
            x0: clean tokens ``[..., d]``.
            x_t: noisy tokens ``[..., d]``.
            t: step indices ``[...]``.

        Returns:
            ``(mean [..., d], variance [..., 1], log_variance [..., 1])``.
        """
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps (DDPM eq. 4 solved for x_0)."""
        return (
            self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    # ------------------------------------------------------------------ reverse process

    def split_output(self, model_output: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a model output ``[..., 2d]`` into eps ``[..., d]`` and v ``[..., d]`` (None without learn_sigma)."""
        expected = d * self.output_channels_factor
        if model_output.shape[-1] != expected:
            raise ValueError(f"model output has {model_output.shape[-1]} channels, expected {expected}")
        if not self.learn_sigma:
            return model_output, None
        return model_output[..., :d], model_output[..., d:]

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, clip: bool = True
    ) -> MeanVariance:
        """The reverse step p(x_{t-1} | x_t) implied by a model output (no x_0 clipping, as MAR).

        Mean: mu~(pred_x0, x_t) with pred_x0 from eps, i.e. DDPM eq. 11. Variance with
        learn_sigma: exp(frac log beta_t + (1 - frac) log beta~_t), frac = (v + 1) / 2
        (IDDPM eq. 15); otherwise the fixed variance.

        Args:
            model_output: ``[..., 2d]`` (``[..., d]`` without learn_sigma).
            x_t: noisy tokens ``[..., d]``.
            t: step indices of this process ``[...]``.
            clip: apply ``clip_x0`` when it is set (default True; the training loss passes False).
        """
        eps, v = self.split_output(model_output, x_t.shape[-1])
        if v is not None:
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._at("fixed_variance_values", t, x_t).expand_as(x_t)
            log_variance = self._at("fixed_log_variance_values", t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip and self.clip_x0 is not None:  # ADM's clip_denoised (off in MAR)
            pred_x0 = pred_x0.clamp(-self.clip_x0, self.clip_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return MeanVariance(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)

    # ------------------------------------------------------------------ training

    def loss_terms(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> DiffusionLoss:
        """Per-token loss of a model output: MSE on eps plus, with learn_sigma, the VB term.

        The VB term sees the eps channels detached, so it trains only the variance
        channels (IDDPM section 3.1, L_hybrid eq. 16 with lambda = 1 as in MAR: the
        terms are simply added, not rescaled). KL in bits (DDPM eq. 5's L_{t-1}); at
        ``t = 0`` the decoder NLL (L_0, DDPM eq. 13).

        Args:
            model_output: ``[..., 2d]`` (``[..., d]`` without learn_sigma).
            x0: clean tokens ``[..., d]``.
            x_t: noisy tokens ``[..., d]`` (``q_sample(x0, t, noise)``).
            t: step indices ``[...]``.
            noise: the eps used to make ``x_t``.
        """
        eps, v = self.split_output(model_output, x0.shape[-1])
        mse = ((noise - eps) ** 2).mean(dim=-1)  # [...]  (DDPM eq. 14, mean over the token dim)
        if v is None:
            return DiffusionLoss(loss=mse, mse=mse, vb=torch.zeros_like(mse))
        frozen = torch.cat([eps.detach(), v], dim=-1)
        step = self.p_mean_variance(frozen, x_t, t, clip=False)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, step.mean, step.log_variance).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance).mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return DiffusionLoss(loss=mse + vb, mse=mse, vb=vb)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> DiffusionLoss:
        """Draw (t, eps) per token, noise ``x0`` and return the per-token loss terms.

        Args:
            model_fn: ``(x_t [..., d], t_original [...]) -> [..., 2d]``.
            x0: clean tokens ``[..., d]``.
            t: step indices ``[...]`` (default None: uniform on ``0 .. T-1`` from ``generator``).
            noise: eps ``[..., d]`` (default None: standard normal from ``generator``).
            generator: the random stream for t and eps (default None: global RNG).
        """
        if t is None:
            t = _randint(self.num_timesteps, x0.shape[:-1], generator=generator, device=x0.device)
        if noise is None:
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, self.original_timesteps(t)).to(x0.dtype)
        return self.loss_terms(out, x0, x_t, t, noise)

    # ------------------------------------------------------------------ respacing

    def respace(self, num_steps: int) -> GaussianDiffusion:
        """A process over ``num_steps`` of these steps (ADM ``space_timesteps(T, [num_steps])``).

        The kept steps' ``alphas_cumprod`` are unchanged; betas are recomputed as
        ``1 - abar_k / abar_{k_prev}`` (IDDPM section 4), and the model is still called
        with the original timesteps through ``timestep_map``.

        Args:
            num_steps: number of steps to keep, 1 .. T.
        """
        kept = space_timesteps(self.num_timesteps, num_steps)
        betas, last = [], 1.0
        for k in kept:
            betas.append(1.0 - self.alphas_cumprod[k] / last)
            last = self.alphas_cumprod[k]
        if len(betas) < 2:
            raise ValueError("a respaced process needs at least 2 steps")
        return GaussianDiffusion(
            np.asarray(betas, dtype=np.float64),
            learn_sigma=self.learn_sigma,
            fixed_variance=self.fixed_variance,
            sampler=self.sampler,
            ddim_eta=self.ddim_eta,
            clip_x0=self.clip_x0,
            timestep_map=[self.timestep_map[k] for k in kept],
        )

    # ------------------------------------------------------------------ sampling

    def guided_output(
        self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, cfg: float | torch.Tensor, guided: bool
    ) -> torch.Tensor:
        """Model output for the current state, with classifier-free guidance on eps when ``guided``.

        Guided: the model sees ``[x; x]`` (conditional rows first, then the null-context
        rows, sharing the state), eps = eps_u + cfg (eps_c - eps_u); the variance channels
        are the conditional half's as the model gives them (MAR).

        Args:
            model_fn: ``(x_t [B', ..., d], t_original [B', ...] or broadcastable) -> [B', ..., 2d]``.
            x: state ``[B, ..., d]``.
            t: step indices ``[B, ...]``, or one step broadcast over the rows (``[1, ...]``).
            cfg: guidance scale (a float or a 0-dim tensor).
            guided: whether the model's batch is ``[conditional; unconditional]``.
        """
        if not guided:
            return model_fn(x, self.original_timesteps(t)).to(x.dtype)
        t2 = t if t.shape[0] == 1 else torch.cat([t, t], dim=0)  # a broadcast step needs no copy
        out = model_fn(torch.cat([x, x], dim=0), self.original_timesteps(t2)).to(x.dtype)
        cond, uncond = out.chunk(2, dim=0)
        d = x.shape[-1]
        eps = uncond[..., :d] + cfg * (cond[..., :d] - uncond[..., :d])
        return torch.cat([eps, cond[..., d:]], dim=-1)

    def reverse_step(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        delta: torch.Tensor | None,
        *,
        cfg: float | torch.Tensor,
        guided: bool,
        temperature: float,
    ) -> torch.Tensor:
        """One reverse step ``x_k -> x_{k-1}``, a pure function of its inputs (see :meth:`sample`).

        Args:
            model_fn: as in :meth:`sample`.
            x: the state ``[B, ..., d]``.
            t: this step's index, broadcast over the rows and tokens ``[1, ...]``.
            delta: this step's standard normal draw ``[B, ..., d]``, or None for a noiseless step.
            cfg: guidance scale (a float or a 0-dim tensor).
            guided: whether the model's batch is ``[conditional; unconditional]``.
            temperature: multiplies ``delta``.
        """
        out = self.guided_output(model_fn, x, t, cfg, guided)  # step 1
        step = self.p_mean_variance(out, x, t)  # step 2
        if self.sampler == "ddpm":
            if delta is None:
                return step.mean
            return step.mean + torch.exp(0.5 * step.log_variance) * delta * temperature  # step 3
        eps, _ = self.split_output(out, x.shape[-1])
        abar = self._at("alphas_cumprod", t, x)
        abar_prev = self._at("alphas_cumprod_prev", t, x)
        if self.clip_x0 is not None:  # eps consistent with the clipped x_0 (ADM)
            eps = (x - torch.sqrt(abar) * step.pred_x0) / torch.sqrt(1 - abar)
        sigma = self.ddim_eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x = step.pred_x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        return x if delta is None else x + sigma * delta * temperature

    def compiled_reverse_step(self, device: torch.device) -> Callable[..., torch.Tensor]:
        """:meth:`reverse_step` under ``torch.compile`` for ``device``, built once per process.

        On the CPU the generated code gets a C++ wrapper, which removes most of the
        per-kernel Python cost of a step of the small heads.
        """
        if device.type not in self._compiled_steps:
            options = {"cpp_wrapper": True} if device.type == "cpu" else None
            self._compiled_steps[device.type] = torch.compile(self.reverse_step, options=options)
        return self._compiled_steps[device.type]

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        *,
        temperature: float = 1.0,
        cfg: float = 1.0,
        generator: torch.Generator | None = None,
        guided: bool | None = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """Run the reverse process from x_{T-1} = ``noise`` down to x_0.

        DDPM (Algorithm 2 of DDPM, variance of IDDPM eq. 15): for k = K-1 .. 0,
        1. out = model(x_k, t_k) (guided on eps when cfg != 1);
        2. mean, log_var = p_mean_variance(out);
        3. x_{k-1} = mean + temperature * exp(log_var / 2) * delta, no noise at k = 0.
        DDIM (``sampler == "ddim"``, DDIM eq. 12 with sigma from eq. 16 times eta):
        x_{k-1} = sqrt(abar_prev) pred_x0 + sqrt(1 - abar_prev - sigma^2) eps + temperature * sigma * delta.

        Args:
            model_fn: ``(x_t [B', ..., d], t_original [1, ...], broadcast over the rows) -> [B', ..., 2d]``.
            noise: the initial state ``[B, ..., d]`` (B rows; the guided halves share it).
            temperature: multiplies the per-step noise only (MAR; default 1.0).
            cfg: classifier-free guidance scale (default 1.0).
            generator: random stream of the per-step noise (default None: global RNG).
            guided: whether the model batch is doubled ``[cond; uncond]`` (default None:
                ``cfg != 1``).
            compile: run each step through ``torch.compile`` (default False). The draws
                stay outside the compiled code, so the random stream is the same; the
                first calls pay the compilation (see ``SampleSettings.compile``).

        Returns:
            x_0 ``[B, ..., d]``.
        """
        guided = is_guided(cfg) if guided is None else guided
        noisy = temperature != 0 and (self.sampler == "ddpm" or self.ddim_eta > 0)
        step = self.reverse_step
        if compile:
            # Everything the compiled step meets must look the same at every call, or it is
            # compiled again: the constant tables exist before the first call, the scale is
            # a tensor (a linear cfg schedule changes it at every autoregressive step) and
            # the last, noiseless step gets a zero draw instead of None.
            step = self.compiled_reverse_step(noise.device)
            self._build_tables(noise.device, noise.dtype)
            if guided:
                cfg = torch.tensor(cfg, dtype=noise.dtype, device=noise.device)
        x = noise
        for k in reversed(range(self.num_timesteps)):
            # One step for every row and token, broadcast: the heads embed it once, not per token.
            t = torch.full((1,) * (x.dim() - 1), k, dtype=torch.long, device=x.device)
            if noisy and k > 0:
                delta = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                delta = torch.zeros_like(x) if compile and noisy else None
            x = step(model_fn, x, t, delta, cfg=cfg, guided=guided, temperature=temperature)
        return x
