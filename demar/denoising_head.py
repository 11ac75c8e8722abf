"""De-MAR's denoising head and the noise injection that trains it.

Training (method.md, training steps 2 and 4):

- :class:`NoiseInjector`: every unmasked token becomes
  ``x~ = sqrt(abar_s) x + sqrt(1 - abar_s) eps`` on the diffusion's own schedule
  (its ``q_sample``), with ``s`` drawn per token (or per image) from
  ``Uniform{0 .. s_max}``.
- :class:`DenoisingHead`, two parallel two-layer MLPs on each unmasked token:

  - refinement branch (paper eq. 2): ``o = SiLU([x~, z] W1 + b1)``,
    ``y = o W2 + b2 + x~``; loss (eq. 3) ``mean_i ||y_i - x_i||`` (L2 norm per
    token, or L1 by knob);
  - assessment branch (eq. 4): ``a = SiLU([x~, sg(y), z] W3 + b3)``,
    ``(s_x, s_y) = a W4 + b4``; targets (eq. 5) ``c_x = cos(x~, x)``,
    ``c_y = cos(y, x)`` held constant; loss (eq. 6)
    ``mean_i |s_x - c_x| + |s_y - c_y|``. ``y`` enters detached, so the
    assessment loss never trains the refinement branch.

Sampling (method.md, sampling step 3): scores clamped to ``>= score_eps`` and
the token becomes ``(s_x x~ + s_y y) / (s_x + s_y)``: a convex combination,
weights positive and summing to 1.

Init: xavier-uniform weights and zero biases (as the backbone), except ``W2``
and ``b2``, zero-initialised so that the refinement branch starts as the
identity ``y = x~`` (the residual-branch zero init of DiT's adaLN-Zero): an
untrained head leaves tokens unchanged rather than adding noise to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from demar.backbone import uniform
from demar.config import StrictConfig
from demar.diffusion import DiffusionConfig, GaussianDiffusion, randn

__all__ = [
    "DenoiseOutput",
    "DenoisingHead",
    "DenoisingHeadConfig",
    "DenoisingLoss",
    "NoiseInjectionConfig",
    "NoiseInjector",
]


class NoiseInjectionConfig(StrictConfig):
    """Noise on the unmasked training tokens (method.md, training step 2; De. Head rows only).

    Args:
        max_step: s_max, the largest diffusion step drawn (default 100 of T = 1000:
            abar ~ 0.97 under the cosine schedule, noise std ~ 0.17 of a unit-scale token).
        distribution: ``"uniform"`` (default: s ~ Uniform{0 .. s_max} independently per
            token) or ``"uniform_per_image"`` (one such s shared by an image's tokens).
        schedule: beta schedule of the injected noise; ``None`` (default) uses the
            diffusion head's schedule, otherwise ``"linear"`` or ``"cosine"`` with the
            diffusion's other settings.
    """

    max_step: int = Field(100, ge=0)
    distribution: Literal["uniform", "uniform_per_image"] = "uniform"
    schedule: Literal["linear", "cosine"] | None = None


class DenoisingHeadConfig(StrictConfig):
    """Hyperparameters of the denoising head (method.md, training step 4).

    Args:
        hidden_dim: hidden width of both branches; ``None`` (default) uses the
            backbone width D.
        refine_loss: per-token norm of ``y - x`` in the refinement loss, ``"l2"``
            (default, paper eq. 3) or ``"l1"``.
        score_eps: lower clamp of the assessment scores before fusion (default 1e-4),
            so fusion weights stay positive and finite.
    """

    hidden_dim: int | None = Field(None, ge=1)
    refine_loss: Literal["l2", "l1"] = "l2"
    score_eps: float = Field(1e-4, gt=0.0)


@dataclass(frozen=True)
class DenoiseOutput:
    """What the head predicts for tokens ``[B, M, d]``.

    Attributes:
        refined: y, the refinement branch's output ``[B, M, d]``.
        scores: the assessment branch's raw scores ``[B, M, 2]``: (s_x, s_y).
    """

    refined: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class DenoisingLoss:
    """Per-token losses of the denoising head (both ``[B, M]``).

    Attributes:
        refinement: ``||y - x||`` (paper eq. 3 before the mean).
        assessment: ``|s_x - c_x| + |s_y - c_y|`` (paper eq. 6 before the mean).
    """

    refinement: torch.Tensor
    assessment: torch.Tensor


class NoiseInjector(nn.Module):
    """x -> x~ = sqrt(abar_s) x + sqrt(1 - abar_s) eps, s ~ Uniform{0 .. s_max} (method.md, training step 2).

    Args:
        cfg: the injection knobs.
        diffusion: the diffusion head's diffusion config; its schedule (or the one
            named by ``cfg.schedule``) supplies ``abar`` through
            :meth:`demar.diffusion.GaussianDiffusion.q_sample`.
    """

    def __init__(self, cfg: NoiseInjectionConfig, diffusion: DiffusionConfig) -> None:
        super().__init__()
        if cfg.max_step >= diffusion.num_timesteps:
            raise ValueError(f"noise max_step {cfg.max_step} must be below num_timesteps {diffusion.num_timesteps}")
        if cfg.schedule is not None:
            diffusion = diffusion.model_copy(update={"schedule": cfg.schedule})
        self.cfg = cfg
        self.process = GaussianDiffusion.from_config(diffusion)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise tokens ``x [B, M, d] -> x~ [B, M, d]``.

        Args:
            x: clean tokens ``[B, M, d]``.
            generator: the source of s and eps (default ``None``: torch's default generator).
        """
        b, m, _ = x.shape
        shape = (b, m) if self.cfg.distribution == "uniform" else (b, 1)
        u = uniform(shape, generator, x.device, torch.float64)
        s = (u * (self.cfg.max_step + 1)).long().clamp(max=self.cfg.max_step).expand(b, m)  # [B, M] in 0..s_max
        eps = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # [B, M, d]
        return self.process.q_sample(x, s, eps)  # [B, M, d]


class DenoisingHead(nn.Module):
    """Refinement and assessment branches on unmasked tokens (paper eqs. 2-6).

    Args:
        token_dim: token features d.
        cond_dim: conditional-token width D (the backbone width).
        cfg: the head's knobs (hidden width, refinement norm, score clamp).
    """

    def __init__(self, token_dim: int, cond_dim: int, cfg: DenoisingHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dim or cond_dim
        # Refinement branch (eq. 2): W1, b1 on [x~, z]; W2, b2 back to d.
        self.refine_in = nn.Linear(token_dim + cond_dim, hidden)
        self.refine_out = nn.Linear(hidden, token_dim)
        # Assessment branch (eq. 4): W3, b3 on [x~, y, z]; W4, b4 to the two scores.
        self.assess_in = nn.Linear(2 * token_dim + cond_dim, hidden)
        self.assess_out = nn.Linear(hidden, 2)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform weights, zero biases; ``refine_out`` zero so that y = x~ at init."""
        for m in (self.refine_in, self.refine_out, self.assess_in, self.assess_out):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.refine_out.weight)

    def forward(self, x_noisy: torch.Tensor, z: torch.Tensor) -> DenoiseOutput:
        """Refined tokens and scores for ``x_noisy [B, M, d]`` given ``z [B, M, D]``.

        Args:
            x_noisy: the input tokens x~ ``[B, M, d]``.
            z: their conditional tokens ``[B, M, D]``.
        """
        x_noisy = x_noisy.to(z.dtype)
        o = F.silu(self.refine_in(torch.cat([x_noisy, z], dim=-1)))  # [B, M, h]     eq. 2
        y = self.refine_out(o) + x_noisy  # [B, M, d]                                 eq. 2
        a = F.silu(self.assess_in(torch.cat([x_noisy, y.detach(), z], dim=-1)))  # [B, M, h]  eq. 4
        scores = self.assess_out(a)  # [B, M, 2]: (s_x, s_y)                          eq. 4
        return DenoiseOutput(refined=y, scores=scores)

    def loss(self, x_noisy: torch.Tensor, z: torch.Tensor, target: torch.Tensor) -> DenoisingLoss:
        """Per-token refinement and assessment losses (paper eqs. 3, 5, 6).

        Args:
            x_noisy: the noisy unmasked tokens x~ ``[B, M, d]``.
            z: their conditional tokens ``[B, M, D]``.
            target: the clean tokens x ``[B, M, d]``.
        """
        out = self.forward(x_noisy, z)
        y = out.refined  # [B, M, d]
        diff = y - target.to(y.dtype)  # [B, M, d]
        if self.cfg.refine_loss == "l2":
            refinement = torch.linalg.vector_norm(diff, ord=2, dim=-1)  # [B, M]  eq. 3
        else:
            refinement = diff.abs().sum(dim=-1)  # [B, M]
        with torch.no_grad():  # eq. 5: ground-truth quality scores are constants
            c_x = F.cosine_similarity(x_noisy.to(y.dtype), target.to(y.dtype), dim=-1)  # [B, M]
            c_y = F.cosine_similarity(y, target.to(y.dtype), dim=-1)  # [B, M]
        s_x, s_y = out.scores.unbind(-1)  # [B, M] each
        assessment = (s_x - c_x).abs() + (s_y - c_y).abs()  # [B, M]  eq. 6
        return DenoisingLoss(refinement=refinement, assessment=assessment)

    def fusion_weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores ``[..., 2]`` -> fusion weights ``[..., 2]``: clamped to ``>= score_eps`` and normalised to sum 1."""
        s = scores.clamp(min=self.cfg.score_eps)
        return s / s.sum(dim=-1, keepdim=True)

    def refine(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One refinement pass at sampling time (method.md, sampling step 3).

        Args:
            x: tokens predicted at earlier steps ``[B, M, d]``.
            z: their conditional tokens ``[B, M, D]`` (the conditional half under CFG).

        Returns:
            ``w_x x + w_y y`` ``[B, M, d]`` with weights from :meth:`fusion_weights`.
        """
        out = self.forward(x, z)
        w = self.fusion_weights(out.scores)  # [B, M, 2]
        fused = w[..., :1] * x.to(out.refined.dtype) + w[..., 1:] * out.refined  # [B, M, d]
        return fused.to(x.dtype)
