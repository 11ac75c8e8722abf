"""Small building blocks shared by both diffusion heads.

- :func:`timestep_embedding`: the sinusoidal embedding of (possibly fractional)
  diffusion timesteps used by ADM, DiT and MAR (cosines first, then sines).
- :class:`TimestepEmbedder`: that embedding followed by a two-layer SiLU MLP.
  Its submodule names (``mlp.0``, ``mlp.2``) are those of MAR's head, so the
  official MAR weights load without renaming inside it.
- :func:`modulate`: DiT's adaLN modulation ``x * (1 + scale) + shift``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TimestepEmbedder", "modulate", "timestep_embedding"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's adaptive LayerNorm modulation: ``x * (1 + scale) + shift``.

    Args:
        x: normalised activations ``[..., w]``.
        shift: additive term, broadcastable to ``x``.
        scale: multiplicative term around 1, broadcastable to ``x``.
    """
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (ADM / DiT convention: ``[cos, sin]``).

    Args:
        t: timesteps of any shape ``[...]`` (integers or floats; fractional values allowed).
        dim: number of output features; an odd ``dim`` gets one trailing zero feature.
        max_period: the longest period of the sinusoids (default ``10000.0``).

    Returns:
        ``[..., dim]`` float32 tensor on ``t``'s device.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # [half]
    args = t.to(torch.float32).unsqueeze(-1) * freqs  # [..., half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [..., 2 * half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timesteps -> sinusoidal features -> Linear -> SiLU -> Linear -> ``[..., width]``.

    Args:
        width: output features ``w``.
        frequency_embedding_size: number of sinusoidal features fed to the MLP (MAR: 256).
        max_period: longest sinusoid period (default ``10000.0``).
    """

    def __init__(self, width: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        # Names mlp.0 / mlp.2 match MAR's SimpleMLPAdaLN.time_embed.
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps ``t [...]`` into ``[..., w]`` (in the dtype of the MLP's weights).

        A training batch draws thousands of timesteps from T values, so each distinct
        value is embedded once and the rows are gathered (the same numbers up to float
        rounding, about a quarter of the MLP's work at MAR's settings).
        """
        if t.numel() > 1 and not torch.compiler.is_compiling():
            values, inverse = torch.unique(t, return_inverse=True)  # [U], [...]
            return self._embed(values)[inverse]  # [..., w]
        return self._embed(t)

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period)  # [..., F]
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # [..., w]
