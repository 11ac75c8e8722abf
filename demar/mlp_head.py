"""MAR's MLP diffusion head (SimpleMLPAdaLN), conditioned on each token's own z_i.

Architecture (mar-reference.md, "MLP diffusion head"):

    x = input_proj(x_t)                          # Linear d -> w
    y = time_embed(t) + cond_embed(z)            # adaLN context, [.., w]
    for each of `depth` res blocks:
        shift, scale, gate = adaLN_modulation(y) # SiLU -> Linear w -> 3w
        x = x + gate * mlp(modulate(in_ln(x), shift, scale))   # mlp: Linear, SiLU, Linear
    shift, scale = final_layer.adaLN_modulation(y)
    out = final_layer.linear(modulate(final_layer.norm_final(x), shift, scale))   # w -> 2d

Submodule names are exactly those of the official ``SimpleMLPAdaLN`` so that an
official MAR state dict maps onto ours by replacing the prefix ``diffloss.net.``
with this head's prefix. The layout of the chunks (shift, scale, gate) matters for
those weights and is kept.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from demar.config import StrictConfig
from demar.diffusion import DiffusionConfig
from demar.diffusion_head import DiffusionHead
from demar.embeddings import TimestepEmbedder, modulate

__all__ = ["MLPHead", "MLPHeadConfig"]


class MLPHeadConfig(StrictConfig):
    """Hyperparameters of MAR's MLP head.

    Attributes:
        depth: number of residual blocks (MAR-B/L/H: 6 / 8 / 12).
        width: hidden width w (MAR-B/L/H: 1024 / 1280 / 1536).
        diffusion_batch_mul: (t, eps) draws per conditional token in training (MAR: 4).
        frequency_embedding_size: sinusoidal timestep features (MAR: 256).
    """

    depth: int = Field(6, ge=1)
    width: int = Field(1024, ge=1)
    diffusion_batch_mul: int = Field(4, ge=1)
    frequency_embedding_size: int = Field(256, ge=2)


class ResBlock(nn.Module):
    """adaLN residual MLP block: ``x + gate * MLP(modulate(LN(x), shift, scale))``.

    Args:
        width: channels w.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x [..., w]``, context ``y [..., w]`` -> ``[..., w]``."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # 3 x [..., w]
        h = modulate(self.in_ln(x), shift, scale)  # [..., w]
        return x + gate * self.mlp(h)  # [..., w]


class FinalLayer(nn.Module):
    """DiT's final layer: affine-free LayerNorm, adaLN modulation, Linear w -> out.

    Args:
        width: channels w.
        out_channels: output channels (2d with learn_sigma).
    """

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x [..., w]``, context ``y [..., w]`` -> ``[..., out]``."""
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # 2 x [..., w]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [..., out]


class MLPHead(DiffusionHead):
    """MAR's SimpleMLPAdaLN diffusion head (method.md, training step 5, "MLP head").

    Args:
        cfg: the head's hyperparameters.
        token_dim: token channels d.
        cond_dim: width D of the conditional tokens z.
        diffusion: diffusion hyperparameters (default: MAR's, cosine, T = 1000, learn_sigma).
    """

    def __init__(
        self,
        cfg: MLPHeadConfig,
        *,
        token_dim: int,
        cond_dim: int,
        diffusion: DiffusionConfig | None = None,
    ) -> None:
        super().__init__(token_dim, cond_dim, diffusion or DiffusionConfig(), cfg.diffusion_batch_mul)
        self.cfg = cfg
        self.grad_checkpointing = False  # recompute the blocks in the backward pass (train.grad_checkpointing)
        w = cfg.width
        self.time_embed = TimestepEmbedder(w, cfg.frequency_embedding_size)
        self.cond_embed = nn.Linear(cond_dim, w)
        self.input_proj = nn.Linear(token_dim, w)
        self.res_blocks = nn.ModuleList([ResBlock(w) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(w, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: xavier-uniform Linear weights and zero biases; the timestep MLP
        normal(0, 0.02) (DiT); every adaLN projection and the output Linear zero, so the
        blocks start as the identity and the head's first output is 0 (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def prepare(self, z: torch.Tensor, z_all: torch.Tensor | None, *, cache_kv: bool = True) -> torch.Tensor:
        """Condition projection ``cond_embed(z)``: ``[B, M, D] -> [B, M, w]`` (``z_all``, ``cache_kv`` unused)."""
        return self.cond_embed(z.to(self._dtype))  # [B, M, w]

    def repeat_condition(self, cond: torch.Tensor, repeats: int) -> torch.Tensor:
        """``[B, M, w] -> [B, repeats * M, w]``."""
        return cond.repeat(1, repeats, 1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x_t [B, M, d]``, ``t [B, M]`` (or broadcastable), ``cond [B, M, w]`` -> ``[B, M, out_channels]``."""
        x = self.input_proj(x_t)  # [B, M, w]
        y = self.time_embed(t) + cond  # [B, M, w] adaLN context
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)  # [B, M, w]
        return self.final_layer(x, y)  # [B, M, out_channels]
