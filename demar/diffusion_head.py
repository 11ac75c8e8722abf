"""The diffusion head base: MAR's per-token diffusion loss and sampler, once for both heads.

A head models p(x_i | z) for the tokens chosen at a step (method.md, training step
5 and sampling step 4). Subclasses supply only the network:

- ``prepare(z, z_all, cache_kv)``: everything that depends on the conditions alone and
  is therefore computed once per call of :meth:`DiffusionHead.loss` or once per
  autoregressive step in :meth:`DiffusionHead.sample` (e.g. the condition projection,
  the transformer head's normalised ``z'`` and its per-block keys/values);
- ``denoise(x_t, t, cond)``: the noise estimate ``[B, M, 2d]`` (``[B, M, d]`` without
  learn_sigma) at ORIGINAL timesteps ``t [B, M]``.

The head owns its T-step training diffusion and caches respaced sampling
diffusions by step count. Neither is a module, so state dicts hold weights only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from demar.diffusion import DiffusionConfig, GaussianDiffusion, is_guided, randn

__all__ = ["DiffusionHead"]


class DiffusionHead(nn.Module, ABC):
    """Base of the MLP and Transformer diffusion heads.

    Args:
        token_dim: token channels d.
        cond_dim: width D of the conditional tokens z.
        diffusion: the diffusion hyperparameters (schedule, T, learn_sigma, sampler).
        diffusion_batch_mul: (t, eps) draws per conditional token in :meth:`loss` (MAR: 4).
    """

    def __init__(self, token_dim: int, cond_dim: int, diffusion: DiffusionConfig, diffusion_batch_mul: int) -> None:
        super().__init__()
        if diffusion_batch_mul < 1:
            raise ValueError("diffusion_batch_mul must be >= 1")
        self.token_dim = token_dim
        self.cond_dim = cond_dim
        self.diffusion_config = diffusion
        self.diffusion_batch_mul = diffusion_batch_mul
        self.train_diffusion = GaussianDiffusion.from_config(diffusion)
        self.out_channels = token_dim * self.train_diffusion.output_channels_factor
        self._sampling_diffusions: dict[int, GaussianDiffusion] = {}

    # ------------------------------------------------------------------ the network (subclasses)

    @abstractmethod
    def prepare(self, z: torch.Tensor, z_all: torch.Tensor | None, *, cache_kv: bool = True) -> Any:
        """Work that depends on the conditions only, done once per loss call / AR step.

        Args:
            z: conditional tokens of the tokens to denoise ``[B, M, D]``.
            z_all: conditional tokens of all N positions ``[B, N, D]`` (the MLP head ignores it).
            cache_kv: precompute attention keys/values (default True); only the transformer head uses it.
        """

    @abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Noise estimate for ``x_t [B, M, d]`` at original timesteps ``t [B, M]`` -> ``[B, M, out_channels]``.

        Args:
            x_t: noisy tokens.
            t: one original (un-respaced) timestep per token, or ``[1, 1]`` broadcast over all (sampling).
            cond: what :meth:`prepare` returned for the same B rows and M tokens.
        """

    @abstractmethod
    def repeat_condition(self, cond: Any, repeats: int) -> Any:
        """``cond`` of M tokens as the condition of ``repeats * M`` tokens ``[c; c; ...]`` along the token axis.

        Args:
            cond: what :meth:`prepare` returned.
            repeats: copies (the training loss's ``diffusion_batch_mul``).
        """

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, z_all: torch.Tensor | None) -> torch.Tensor:
        """One plain network evaluation: ``denoise(x_t, t, prepare(z, z_all))`` -> ``[B, M, out_channels]``."""
        return self.denoise(x_t, t, self.prepare(z, z_all))

    # ------------------------------------------------------------------ shared by both heads

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def sampling_diffusion(self, num_steps: int) -> GaussianDiffusion:
        """The training diffusion respaced to ``num_steps`` steps (cached per step count)."""
        if num_steps not in self._sampling_diffusions:
            if num_steps == self.train_diffusion.num_timesteps:
                self._sampling_diffusions[num_steps] = self.train_diffusion
            else:
                self._sampling_diffusions[num_steps] = self.train_diffusion.respace(num_steps)
        return self._sampling_diffusions[num_steps]

    def loss(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        z_all: torch.Tensor | None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-token diffusion loss (MSE on eps + VB with learn_sigma), averaged over the draws.

        Each conditional token is reused for ``diffusion_batch_mul`` independent draws
        of (t, eps) (MAR). The draws are laid out along the token axis, ``[B, R*M]``, so
        per-image work (the transformer head's keys/values of ``z_all``) is done once
        per image and shared by all draws without copying, and per-token work (the
        projection of ``z``) once per token and repeated.

        Args:
            target: clean tokens ``[B, M, d]``.
            z: their conditional tokens ``[B, M, D]``.
            z_all: conditional tokens of all positions ``[B, N, D]`` (ignored by the MLP head).
            generator: random stream for t and eps (default None: global RNG).

        Returns:
            ``[B, M]`` loss per token (the caller averages over the tokens it wants).
        """
        bsz, m, _ = target.shape
        r = self.diffusion_batch_mul
        x0 = target.to(self._dtype).repeat(1, r, 1)  # [B, R*M, d]
        cond = self.repeat_condition(self.prepare(z, z_all, cache_kv=True), r)  # per-token part for R*M tokens
        terms = self.train_diffusion.training_losses(lambda x_t, t: self.denoise(x_t, t, cond), x0, generator=generator)
        return terms.loss.view(bsz, r, m).mean(dim=1)  # [B, M]

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        z_all: torch.Tensor | None,
        *,
        num_steps: int,
        temperature: float,
        cfg: float,
        generator: torch.Generator | None,
        cache_kv: bool = True,
        compile: bool = False,
    ) -> torch.Tensor:
        """Sample tokens by the respaced reverse process (method.md, sampling step 4).

        With ``cfg != 1`` the batch is ``B' = 2B`` rows, ``[conditional; null context]``;
        both halves share their initial noise (and state), eps is guided and the
        conditional half's variance is used; the ``B`` guided rows are returned.

        Args:
            z: conditional tokens of the tokens to sample ``[B', M, D]``.
            z_all: conditional tokens of all positions ``[B', N, D]`` (ignored by the MLP head).
            num_steps: diffusion steps of the respaced process (MAR: 100).
            temperature: multiplies the per-step noise (MAR; 1.0 = plain ancestral sampling).
            cfg: classifier-free guidance scale on eps (1.0 = none).
            generator: random stream for the initial and per-step noise (None: global RNG).
            cache_kv: compute the transformer head's attention keys/values once for all
                diffusion steps (default True; False recomputes them at every step).
            compile: run each diffusion step through ``torch.compile`` (default False).

        Returns:
            ``[B, M, d]`` sampled tokens.
        """
        guided = is_guided(cfg)
        rows, m, _ = z.shape
        if guided and rows % 2:
            raise ValueError(f"cfg != 1 needs [conditional; unconditional] halves, got {rows} rows")
        bsz = rows // 2 if guided else rows
        diffusion = self.sampling_diffusion(num_steps)
        cond = self.prepare(z, z_all, cache_kv=cache_kv)
        noise = randn((bsz, m, self.token_dim), generator=generator, device=z.device, dtype=self._dtype)
        return diffusion.sample(
            lambda x_t, t: self.denoise(x_t, t, cond),
            noise,
            temperature=temperature,
            cfg=cfg,
            generator=generator,
            guided=guided,
            compile=compile,
        )
