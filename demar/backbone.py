"""MAR's MAE-style encoder/decoder: the backbone that turns tokens and context into z.

The backbone follows MAR (``mar-reference.md``, "Model"): a pre-norm ViT encoder
that sees only the unmasked tokens plus ``buffer_size`` buffer tokens holding the
context, and a pre-norm ViT decoder that sees every position (masked ones filled
with a learned mask token). Its output is one conditional vector ``z_i`` per token
position, masked or not (method.md, training step 3): the seam where the
diffusion head and the denoising head plug in.

Context (method.md, "Notation"):

- ``context="class"``: labels ``LongTensor [B]`` -> ``class_emb`` placed in every
  buffer slot (MAR).
- ``context="text"``: text-encoder tokens ``FloatTensor [B, L, Dc]`` ->
  ``context_proj`` (Linear ``Dc -> D``) placed in the first ``L`` buffer slots; the
  remaining ``buffer_size - L`` slots hold the null vector, so short captions and
  long buffers both work and every slot still carries a defined value.

In both cases a learned null vector (MAR's ``fake_latent``) replaces the whole
context of an image with probability ``label_drop_prob`` during training, and is
the null context of classifier-free guidance at sampling time.

Module and parameter names (``class_emb``, ``fake_latent``, ``z_proj``,
``z_proj_ln``, ``encoder_pos_embed_learned``, ``encoder_blocks.{i}.norm1``,
``.attn.qkv``, ``.attn.proj``, ``.norm2``, ``.mlp.fc1``, ``.mlp.fc2``,
``encoder_norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed_learned``,
``decoder_blocks.*``, ``decoder_norm``, ``diffusion_pos_embed_learned``) are those
of the official ``models/mar.py`` and timm's ViT ``Block``, so official weights
map onto this module by a prefix (see :mod:`demar.mar_checkpoint`).

Randomness: masking ratios, orders and label drop come from an explicit
``torch.Generator``. Dropout (attention 0.1, projection 0.1 in MAR) uses torch's
global RNG, because neither ``nn.Dropout`` nor ``scaled_dot_product_attention``
accepts a generator; training seeds it (``torch.manual_seed``) and evaluation
turns dropout off.
"""

from __future__ import annotations

import math
from typing import Literal

import scipy.special
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from demar.config import StrictConfig

__all__ = [
    "Attention",
    "Block",
    "MARBackbone",
    "MaskingConfig",
    "Mlp",
    "draw_mask_ratio",
    "gather_tokens",
    "mask_from_orders",
    "random_orders",
    "scatter_tokens",
    "uniform",
]

# LayerNorm epsilon of MAR's blocks and norms (timm ViT convention); an
# architectural constant of the checkpoint layout, not a tunable knob.
LN_EPS = 1e-6


class MaskingConfig(StrictConfig):
    """How many tokens one training batch masks (method.md, training step 1).

    One ratio ``r`` is drawn per batch and ``ceil(r * N)`` tokens of a random order
    are masked in every image.

    Args:
        distribution: ``"truncnorm"`` (MAR, ImageNet: N(mu, std^2) truncated to
            ``[mask_ratio_min, mask_ratio_max]``) or ``"beta"`` (MS-COCO:
            Beta(a, b) truncated to the same interval). Default ``"truncnorm"``.
        mask_ratio_min: lower end of the ratio's support (default 0.7).
        mask_ratio_max: upper end of the ratio's support (default 1.0).
        mask_ratio_mu: mean of the untruncated normal (default 1.0).
        mask_ratio_std: standard deviation of the untruncated normal (default 0.25).
        beta_a: Beta's first shape parameter (default 3.0).
        beta_b: Beta's second shape parameter (default 1.0).
    """

    distribution: Literal["truncnorm", "beta"] = "truncnorm"
    mask_ratio_min: float = Field(0.7, gt=0.0, le=1.0)
    mask_ratio_max: float = Field(1.0, gt=0.0, le=1.0)
    mask_ratio_mu: float = 1.0
    mask_ratio_std: float = Field(0.25, gt=0.0)
    beta_a: float = Field(3.0, gt=0.0)
    beta_b: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _check_interval(self) -> MaskingConfig:
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError(f"mask_ratio_min ({self.mask_ratio_min}) > mask_ratio_max ({self.mask_ratio_max})")
        return self


# ---------------------------------------------------------------------------
# Randomness helpers: every draw through an explicit generator.
# ---------------------------------------------------------------------------


def uniform(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U[0, 1) samples drawn with ``generator`` (on its own device) and moved to ``device``.

    Args:
        shape: output shape.
        generator: the source of randomness; ``None`` uses torch's default generator.
        device: where the result lives.
        dtype: floating dtype of the result (default ``torch.float32``).
    """
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def random_orders(batch: int, seq_len: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniformly random permutation of ``range(seq_len)`` per image -> ``LongTensor [B, N]``.

    Args:
        batch: number of images ``B``.
        seq_len: tokens per image ``N``.
        generator: the source of randomness (``None``: torch's default generator).
        device: where the result lives.
    """
    return uniform((batch, seq_len), generator, device).argsort(dim=1)


def draw_mask_ratio(cfg: MaskingConfig, generator: torch.Generator | None) -> float:
    """Draw one masking ratio r from p(r) (method.md, training step 1) by inverse-CDF sampling.

    Args:
        cfg: the masking distribution and its support.
        generator: the source of the one uniform draw (``None``: torch's default generator).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    u = float(uniform((), generator, device, torch.float64))
    lo, hi = cfg.mask_ratio_min, cfg.mask_ratio_max
    if cfg.distribution == "truncnorm":
        # r = mu + std * Phi^-1(Phi(a) + u (Phi(b) - Phi(a))), a, b the standardised bounds.
        a = (lo - cfg.mask_ratio_mu) / cfg.mask_ratio_std
        b = (hi - cfg.mask_ratio_mu) / cfg.mask_ratio_std
        pa, pb = scipy.special.ndtr(a), scipy.special.ndtr(b)
        r = cfg.mask_ratio_mu + cfg.mask_ratio_std * float(scipy.special.ndtri(pa + u * (pb - pa)))
    else:
        # Beta(a, b) restricted to [lo, hi]: invert the regularised incomplete beta function.
        pa = scipy.special.betainc(cfg.beta_a, cfg.beta_b, lo)
        pb = scipy.special.betainc(cfg.beta_a, cfg.beta_b, hi)
        r = float(scipy.special.betaincinv(cfg.beta_a, cfg.beta_b, pa + u * (pb - pa)))
    return min(max(r, lo), hi)


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Mask the first ``num_masked`` positions of each order -> ``BoolTensor [B, N]`` (True = masked).

    Args:
        orders: ``LongTensor [B, N]``, one permutation per image.
        num_masked: how many tokens each image masks.
    """
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick positions per image: ``x [B, N, C]``, ``idx [B, M]`` -> ``x[b, idx[b, m]]`` ``[B, M, C]``.

    Args:
        x: per-position values.
        idx: ``LongTensor [B, M]`` of positions.
    """
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``x [B, N, C]`` whose positions ``idx [B, M]`` hold ``values [B, M, C]``.

    Args:
        x: per-position values.
        idx: ``LongTensor [B, M]`` of positions.
        values: the new values (cast to ``x``'s dtype).
    """
    return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values.to(x.dtype))


# ---------------------------------------------------------------------------
# Pre-norm ViT block (timm's Block layout: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).
# ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, through ``F.scaled_dot_product_attention``.

    Args:
        dim: width ``D``.
        num_heads: attention heads (``D`` must divide evenly).
        attn_drop: dropout on the attention probabilities while training.
        proj_drop: dropout after the output projection while training.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)  # [B, T, 3, h, D/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, T, D/h]
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # [B, h, T, D/h]
        out = out.transpose(1, 2).reshape(b, t, d)  # [B, T, D]
        return self.proj_drop(self.proj(out))  # [B, T, D]


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (timm's ``Mlp``).

    Args:
        dim: width ``D``.
        hidden: hidden width (``mlp_ratio * D``).
        drop: dropout after the activation and after the output layer while training.
    """

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: width ``D``.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``D`` (MAR: 4).
        attn_drop: attention-probability dropout (MAR: 0.1).
        proj_drop: projection and MLP dropout (MAR: 0.1).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------
# The backbone.
# ---------------------------------------------------------------------------


class MARBackbone(nn.Module):
    """MAR's encoder/decoder: tokens ``[B, N, d]`` + mask + context -> z ``[B, N, D]``.

    Args:
        token_dim: token features ``d`` (KL-16, patch 1: 16).
        seq_len: tokens per image ``N`` (ImageNet 256: 256).
        width: transformer width ``D`` (encoder and decoder alike, as in MAR).
        encoder_depth: encoder blocks.
        decoder_depth: decoder blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``D`` (MAR: 4).
        attn_dropout: attention-probability dropout (MAR: 0.1).
        proj_dropout: projection and MLP dropout (MAR: 0.1).
        buffer_size: buffer tokens in front of the sequence, carrying the context (MAR: 64).
        context: ``"class"`` (labels ``[B]``) or ``"text"`` (embeddings ``[B, L, Dc]``).
        num_classes: classes of the class embedding (used when ``context="class"``).
        text_dim: text-encoder width ``Dc`` (used when ``context="text"``).
        label_drop_prob: probability of replacing an image's context by the null
            vector while training (MAR: 0.1).
        masking: the training masking-ratio distribution.
        grad_checkpointing: recompute block activations in the backward pass
            (saves memory while training; default off).
    """

    def __init__(
        self,
        *,
        token_dim: int,
        seq_len: int,
        width: int,
        encoder_depth: int,
        decoder_depth: int,
        num_heads: int,
        mlp_ratio: float,
        attn_dropout: float,
        proj_dropout: float,
        buffer_size: int,
        context: Literal["class", "text"],
        num_classes: int,
        text_dim: int,
        label_drop_prob: float,
        masking: MaskingConfig,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.seq_len = seq_len
        self.width = width
        self.buffer_size = buffer_size
        self.context = context
        self.label_drop_prob = label_drop_prob
        self.masking = masking
        self.grad_checkpointing = grad_checkpointing

        # Context: class embedding or projected text tokens, and the learned null vector.
        if context == "class":
            self.class_emb = nn.Embedding(num_classes, width)
        else:
            self.context_proj = nn.Linear(text_dim, width)
        self.fake_latent = nn.Parameter(torch.zeros(1, width))

        # Encoder.
        self.z_proj = nn.Linear(token_dim, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        self.encoder_blocks = nn.ModuleList(
            [Block(width, num_heads, mlp_ratio, attn_dropout, proj_dropout) for _ in range(encoder_depth)]
        )
        self.encoder_norm = nn.LayerNorm(width, eps=LN_EPS)

        # Decoder.
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        self.decoder_blocks = nn.ModuleList(
            [Block(width, num_heads, mlp_ratio, attn_dropout, proj_dropout) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, width))

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: embeddings and learned vectors normal(0, 0.02), Linear xavier-uniform with zero bias, LayerNorm (1, 0)."""
        std = 0.02  # MAR's (and ViT's) embedding init scale
        for p in (
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=std)
        if self.context == "class":
            nn.init.normal_(self.class_emb.weight, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- masking ----------------------------------------------------------------

    def sample_training_mask(
        self, batch: int, generator: torch.Generator | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Draw one batch's masking (method.md, training step 1).

        Args:
            batch: number of images ``B``.
            generator: the source of randomness (``None``: torch's default generator).
            device: where the tensors live.

        Returns:
            ``(orders [B, N], mask [B, N] bool, num_masked)``: the first ``num_masked``
            positions of each order are masked, ``num_masked = ceil(r N)``.
        """
        r = draw_mask_ratio(self.masking, generator)
        num_masked = math.ceil(r * self.seq_len)
        orders = random_orders(batch, self.seq_len, generator, device)
        return orders, mask_from_orders(orders, num_masked), num_masked

    # -- context ----------------------------------------------------------------

    def null_context(self, batch: int) -> torch.Tensor:
        """The null (unconditional) context for ``batch`` images -> ``[B, buffer_size, D]``."""
        return self.fake_latent.expand(batch, self.buffer_size, -1)

    def embed_context(
        self,
        context: torch.Tensor | None,
        batch: int,
        drop: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Context -> buffer contents ``[B, buffer_size, D]``.

        Args:
            context: labels ``LongTensor [B]``, text tokens ``FloatTensor [B, L, Dc]``
                (``L <= buffer_size``), or ``None`` for the null context everywhere.
            batch: number of images ``B`` (used when ``context`` is ``None``).
            drop: ``BoolTensor [B]``, True where the image gets the null context
                (classifier-free guidance's unconditional half). ``None`` (default):
                while training, drawn with probability ``label_drop_prob`` from
                ``generator``; in eval mode, nothing is dropped.
            generator: the source of the label-drop draw (default ``None``).
        """
        null = self.null_context(batch)  # [B, S, D]
        if context is None:
            return null
        if self.context == "class":
            if context.dim() != 1:
                raise ValueError(f"class context must be labels [B], got shape {tuple(context.shape)}")
            buf = self.class_emb(context).unsqueeze(1).expand(-1, self.buffer_size, -1)  # [B, S, D]
        else:
            if context.dim() != 3:
                raise ValueError(f"text context must be [B, L, Dc], got shape {tuple(context.shape)}")
            length = context.shape[1]
            if length > self.buffer_size:
                raise ValueError(f"text context of {length} tokens exceeds buffer_size {self.buffer_size}")
            text = self.context_proj(context)  # [B, L, D]
            buf = torch.cat([text, null[:, length:]], dim=1)  # [B, S, D]: text first, null after
        if drop is None and self.training and self.label_drop_prob > 0:
            drop = uniform((batch,), generator, buf.device) < self.label_drop_prob  # [B]
        if drop is not None:
            buf = torch.where(drop.view(-1, 1, 1), null.to(buf.dtype), buf)  # [B, S, D]
        return buf

    # -- encoder / decoder -----------------------------------------------------

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """Encoder over the buffer and the unmasked tokens.

        Args:
            tokens: ``[B, N, d]`` (values at masked positions are ignored).
            mask: ``BoolTensor [B, N]``, True = masked; every image masks the same count.
            buffer: context buffer ``[B, S, D]`` from :meth:`embed_context`.

        Returns:
            ``[B, S + N_unmasked, D]``.
        """
        b = tokens.shape[0]
        x = self.z_proj(tokens)  # [B, N, D]
        x = torch.cat([buffer.to(x.dtype), x], dim=1)  # [B, S + N, D]
        x = x + self.encoder_pos_embed_learned  # [B, S + N, D]
        x = self.z_proj_ln(x)
        keep = torch.cat([mask.new_ones(b, self.buffer_size), ~mask], dim=1)  # [B, S + N]
        x = x[keep].reshape(b, -1, self.width)  # [B, S + N_unmasked, D]: drop masked tokens
        x = self._run_blocks(self.encoder_blocks, x)
        return self.encoder_norm(x)  # [B, S + N_unmasked, D]

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder over every position; returns z ``[B, N, D]``.

        Args:
            x: encoder output ``[B, S + N_unmasked, D]``.
            mask: ``BoolTensor [B, N]``, True = masked (the same mask given to the encoder).
        """
        b = x.shape[0]
        x = self.decoder_embed(x)  # [B, S + N_unmasked, D]
        keep = torch.cat([mask.new_ones(b, self.buffer_size), ~mask], dim=1)  # [B, S + N]
        full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + self.seq_len, -1)  # [B, S + N, D]
        full = full.masked_scatter(keep.unsqueeze(-1), x)  # [B, S + N, D]: scatter back
        x = full + self.decoder_pos_embed_learned  # [B, S + N, D]
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = x[:, self.buffer_size :]  # [B, N, D]: drop the buffer
        return x + self.diffusion_pos_embed_learned  # [B, N, D]

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        context: torch.Tensor | None,
        drop_context: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Tokens + mask + context -> conditional tokens z ``[B, N, D]`` (method.md, training step 3).

        Args:
            tokens: ``[B, N, d]``; masked positions are ignored.
            mask: ``BoolTensor [B, N]``, True = masked; every image masks the same count.
            context: labels ``[B]``, text tokens ``[B, L, Dc]`` or ``None`` (null context).
            drop_context: ``BoolTensor [B]`` forcing the null context where True
                (default ``None``: random label drop while training, none in eval).
            generator: the source of the label-drop draw (default ``None``).
        """
        b, n, _ = tokens.shape
        if n != self.seq_len:
            raise ValueError(f"expected {self.seq_len} tokens per image, got {n}")
        counts = mask.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("every image of a batch must mask the same number of tokens")
        buffer = self.embed_context(context, b, drop_context, generator)  # [B, S, D]
        x = self.forward_encoder(tokens, mask, buffer)  # [B, S + N_unmasked, D]
        return self.forward_decoder(x, mask)  # [B, N, D]
