"""De-MAR's Transformer diffusion head (method.md, training step 5, "Transformer head").

Token i is denoised by a stack of blocks whose only access to the image is
cross-attention to the normalised conditional tokens of ALL N positions; the
noisy tokens never attend to each other, so every token is independent given z.

    x_0  = input_proj(x^t_i)                                   # d -> w
    c_i  = W_c SiLU(z_i + te) + b_c                            # ONCE per call, shared by all blocks
                                                               # (z_i projected D -> w when D != w)
    z'   = norm(z_all)                                         # all N positions
    block j:  (alpha1, beta1, alpha2, beta2) = split(scale_j * c_i + shift_j)
              u      = CrossAttn(query = alpha1 * norm(x_j), keys = values = z')
              y      = x_j + tanh(beta1) * norm(u)
              f      = FFN(alpha2 * norm(y))
              x_j+1  = y + tanh(beta2) * norm(f)
    out = Linear(norm(x_depth))                                # w -> 2d, zero-initialised

The attention keys/values depend on z only, so :meth:`TransformerHead.prepare`
computes them once per autoregressive step (``cache_kv=True``) and every diffusion
step reuses them; ``cache_kv=False`` recomputes them, ``norm(z_all)`` included, inside
every ``denoise`` call, as a head without a cache would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from demar.config import StrictConfig
from demar.diffusion import DiffusionConfig
from demar.diffusion_head import DiffusionHead
from demar.embeddings import TimestepEmbedder

__all__ = ["TransformerCondition", "TransformerHead", "TransformerHeadConfig"]

KeysValues = tuple[torch.Tensor, torch.Tensor]
Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class TransformerHeadConfig(StrictConfig):
    """Hyperparameters of the Transformer diffusion head.

    Attributes:
        depth: number of blocks (De-MAR-B/L/H: 4 / 6 / 9).
        width: hidden width w; must be divisible by ``num_heads``.
        num_heads: attention heads of the cross-attention.
        mlp_ratio: FFN hidden width as a multiple of w.
        diffusion_batch_mul: (t, eps) draws per conditional token in training (MAR: 4).
        frequency_embedding_size: sinusoidal timestep features (256, as MAR).
    """

    depth: int = Field(4, ge=1)
    width: int = Field(1024, ge=1)
    num_heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    diffusion_batch_mul: int = Field(4, ge=1)
    frequency_embedding_size: int = Field(256, ge=2)

    @model_validator(mode="after")
    def _check_heads(self) -> TransformerHeadConfig:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        return self


@dataclass(frozen=True)
class TransformerCondition:
    """What :meth:`TransformerHead.prepare` computes once per call.

    Attributes:
        z: the tokens' own conditions, projected to w: ``[B, M, w]``.
        z_all: the conditional tokens of all positions ``[B, N, D]``.
        kv: per block ``(keys, values)`` of ``norm(z_all)``, each ``[B, heads, N, w / heads]``;
            None when not cached.
    """

    z: torch.Tensor
    z_all: torch.Tensor
    kv: list[KeysValues] | None


def _norm(width: int) -> nn.LayerNorm:
    # Affine-free: every norm in the head is followed by a learned scale (alpha, tanh(beta))
    # or by a Linear, which would absorb a LayerNorm's own weight and bias.
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


def gate(beta: torch.Tensor) -> torch.Tensor:
    """``tanh(beta)``, the blocks' output gates.

    On the CPU it is computed as ``2 sigmoid(2 beta) - 1`` (equal up to rounding): PyTorch's
    CPU ``tanh`` kernel is several times slower than its ``sigmoid``, and the gates are
    recomputed at every diffusion step.
    """
    if beta.device.type != "cpu":
        return torch.tanh(beta)
    return 2 * torch.sigmoid(2 * beta) - 1


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T) v`` over ``[B, H, L, hd]`` queries and ``[B, H, N, hd]`` keys/values.

    On the CPU it is three plain ops: PyTorch's fused CPU kernel costs about 0.2 ms per
    call whatever the size, which dominates a diffusion step of the small heads (the
    query sets are a few tokens against N keys). Elsewhere it is the fused kernel.
    The keys come scaled by ``1 / sqrt(hd)`` already (:meth:`CrossAttention.keys_values`).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return torch.matmul(torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1), v)  # [B, H, L, hd]


class CrossAttention(nn.Module):
    """Multi-head attention of queries from the noisy tokens to keys/values from z'.

    Args:
        width: query and output width w.
        kv_dim: width D of the keys' and values' source z'.
        num_heads: number of heads.
    """

    def __init__(self, width: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_dim, 2 * width)
        self.proj = nn.Linear(width, width)

    def keys_values(self, z_norm: torch.Tensor) -> KeysValues:
        """Project ``z' [B, N, D]`` to keys (scaled by ``1 / sqrt(w / heads)``) and values, each ``[B, heads, N, w / heads]``."""
        bsz, n, _ = z_norm.shape
        kv = self.kv(z_norm).view(bsz, n, 2, self.num_heads, -1)  # [B, N, 2, H, hd]
        # Contiguous once here, so the attention of every diffusion step reads them without a copy.
        k, v = kv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # 2 x [B, H, N, hd]
        return k * (k.shape[-1] ** -0.5), v  # the softmax scale, applied once per z instead of per query

    def forward(self, x: torch.Tensor, kv: KeysValues) -> torch.Tensor:
        """Queries ``x [B, L, w]`` (L independent tokens of each image) -> ``[B, L, w]``."""
        bsz, length, width = x.shape
        q = self.q(x).view(bsz, length, self.num_heads, -1).transpose(1, 2)  # [B, H, L, hd]
        k, v = kv
        out = attend(q, k.to(q.dtype), v.to(q.dtype))  # [B, H, L, hd]
        return self.proj(out.transpose(1, 2).reshape(bsz, length, width))  # [B, L, w]


class HeadBlock(nn.Module):
    """One block of the Transformer head, modulated by the shared context c (method.md step 5).

    Args:
        width: w.
        cond_dim: D, the width of z' (keys/values source).
        num_heads: attention heads.
        mlp_ratio: FFN hidden width / w.
    """

    def __init__(self, width: int, cond_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        # c^ = scale_j * c + shift_j, split into (alpha1, beta1, alpha2, beta2); init in
        # TransformerHead.initialize_weights.
        self.scale = nn.Parameter(torch.ones(4 * width))
        self.shift = nn.Parameter(torch.zeros(4 * width))
        self.norm1 = _norm(width)
        self.attn = CrossAttention(width, cond_dim, num_heads)
        self.norm_attn = _norm(width)
        self.norm2 = _norm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm_mlp = _norm(width)

    def forward(self, x: torch.Tensor, mod: Modulation, kv: KeysValues) -> torch.Tensor:
        """``x [B, L, w]``, this block's ``(alpha1, tanh(beta1), alpha2, tanh(beta2))`` from
        :meth:`TransformerHead.modulations`, keys/values of z' -> ``[B, L, w]``."""
        alpha1, gate1, alpha2, gate2 = mod
        u = self.attn(alpha1 * self.norm1(x), kv)  # [B, L, w]
        y = torch.addcmul(x, gate1, self.norm_attn(u))  # x + tanh(beta1) norm(u)
        f = self.mlp(alpha2 * self.norm2(y))  # [B, L, w]
        return torch.addcmul(y, gate2, self.norm_mlp(f))  # y + tanh(beta2) norm(f)


class FinalLayer(nn.Module):
    """Affine-free LayerNorm and a zero-initialised Linear w -> out.

    Args:
        width: w.
        out_channels: 2d with learn_sigma, else d.
    """

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = _norm(width)
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., w] -> [..., out]``."""
        return self.linear(self.norm_final(x))


class TransformerHead(DiffusionHead):
    """The Transformer diffusion head: cross-attention to all N conditional tokens, one shared adaLN.

    Args:
        cfg: the head's hyperparameters.
        token_dim: token channels d.
        cond_dim: width D of the conditional tokens.
        diffusion: diffusion hyperparameters (default: cosine, T = 1000, learn_sigma).
    """

    def __init__(
        self,
        cfg: TransformerHeadConfig,
        *,
        token_dim: int,
        cond_dim: int,
        diffusion: DiffusionConfig | None = None,
    ) -> None:
        super().__init__(token_dim, cond_dim, diffusion or DiffusionConfig(), cfg.diffusion_batch_mul)
        self.cfg = cfg
        self.grad_checkpointing = False  # recompute the blocks in the backward pass (train.grad_checkpointing)
        w = cfg.width
        self.input_proj = nn.Linear(token_dim, w)
        self.time_embed = TimestepEmbedder(w, cfg.frequency_embedding_size)
        # z_i enters the adaLN context directly when D == w (method.md: c^_i = z_i + te).
        self.cond_embed: nn.Module = nn.Linear(cond_dim, w) if cond_dim != w else nn.Identity()
        # The shared adaptive normalisation: c_i = W_c SiLU(z_i + te) + b_c (PixArt-alpha style).
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 4 * w))
        self.z_norm = _norm(cond_dim)
        self.blocks = nn.ModuleList([HeadBlock(w, cond_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(w, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All weight init in one place.

        - Linear layers: xavier-uniform weights, zero biases (MAR / DiT); the timestep MLP
          normal(0, 0.02) (DiT).
        - Shared adaLN projection W_c, b_c: zero, so c = 0 at start (adaLN-Zero, DiT's best).
        - scale_j = 1; shift_j = 1 on the alpha parts and 0 on the beta parts: at start
          alpha = 1 (plain pre-norm queries / FFN input) and tanh(beta) = 0, so every
          block is the identity, as DiT's zero-initialised gates make it. With a zero
          shift instead, alpha = 0 would also silence the queries and FFN inputs.
        - Output Linear: zero, so the head's first prediction is eps = 0, v = 0.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        w = self.cfg.width
        for block in self.blocks:
            nn.init.ones_(block.scale)
            with torch.no_grad():
                block.shift.zero_()
                block.shift[0:w] = 1.0  # alpha1
                block.shift[2 * w : 3 * w] = 1.0  # alpha2
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def prepare(self, z: torch.Tensor, z_all: torch.Tensor | None, *, cache_kv: bool = True) -> TransformerCondition:
        """Once per call: ``z [B, M, D] -> [B, M, w]`` and, with ``cache_kv``, every block's
        keys/values of ``z' = norm(z_all [B, N, D])``."""
        if z_all is None:
            raise ValueError("the transformer head needs z_all, the conditional tokens of all positions")
        if z_all.shape[0] != z.shape[0]:
            raise ValueError(f"z has {z.shape[0]} rows but z_all has {z_all.shape[0]}")
        dtype = self._dtype
        zc = self.cond_embed(z.to(dtype))  # [B, M, w]
        z_all = z_all.to(dtype)  # [B, N, D]
        return TransformerCondition(z=zc, z_all=z_all, kv=self.keys_values(z_all) if cache_kv else None)

    def repeat_condition(self, cond: TransformerCondition, repeats: int) -> TransformerCondition:
        """The tokens' own conditions ``[B, M, w] -> [B, repeats * M, w]``; ``z_all`` and the keys/values are per image."""
        return replace(cond, z=cond.z.repeat(1, repeats, 1))

    def keys_values(self, z_all: torch.Tensor) -> list[KeysValues]:
        """Every block's keys/values of ``z' = norm(z_all [B, N, D])``."""
        z_norm = self.z_norm(z_all)  # [B, N, D]
        return [block.attn.keys_values(z_norm) for block in self.blocks]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: TransformerCondition) -> torch.Tensor:
        """``x_t [B, M, d]``, ``t [B, M]`` (or broadcastable) -> ``[B, M, out_channels]``."""
        x = self.input_proj(x_t)  # [B, M, w]
        c = self.adaLN_modulation(cond.z + self.time_embed(t))  # [B, M, 4w], shared by all blocks
        mods = self.modulations(c)
        kvs = cond.kv if cond.kv is not None else self.keys_values(cond.z_all)  # per block 2 x [B, H, N, hd]
        for block, mod, kv in zip(self.blocks, mods, kvs, strict=True):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mod, kv, use_reentrant=False)
            else:
                x = block(x, mod, kv)  # [B, M, w]
        return self.final_layer(x)  # [B, M, out_channels]

    def modulations(self, c: torch.Tensor) -> list[Modulation]:
        """Every block's ``(alpha1, tanh(beta1), alpha2, tanh(beta2))``, each ``[B, M, w]``, from ``c [B, M, 4w]``.

        ``(alpha1, beta1, alpha2, beta2) = split(scale_j * c + shift_j)``, computed for all j as one
        ``[B, M, depth, 4, w]`` tensor in three ops instead of four per block, with
        the tanh gates of all blocks at once; a diffusion step of a small head is dominated
        by the number of ops, not by their size.
        """
        w, depth = self.cfg.width, len(self.blocks)
        scale = torch.stack([block.scale for block in self.blocks])  # [depth, 4w]
        shift = torch.stack([block.shift for block in self.blocks])  # [depth, 4w]
        m = torch.addcmul(shift, scale, c.unsqueeze(-2)).unflatten(-1, (4, w))  # [B, M, depth, 4, w]
        gates = gate(m[..., 1::2, :])  # [B, M, depth, 2, w]: tanh(beta1), tanh(beta2)
        return [(m[..., j, 0, :], gates[..., j, 0, :], m[..., j, 2, :], gates[..., j, 1, :]) for j in range(depth)]
