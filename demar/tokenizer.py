"""The image tokenizer: LDM's KL-regularised autoencoder (AutoencoderKL) and its latent scale.

Architecture (as in LDM and MAR's KL-16, with this project's code):
- ``Encoder``: conv_in; per level ``i`` (channels ``ch * ch_mult[i]``) ``num_res_blocks``
  ResnetBlocks, each followed by an AttnBlock where the feature map side is in
  ``attn_resolutions``, then a stride-2 Downsample (all levels but the last);
  middle ResnetBlock - AttnBlock - ResnetBlock; GroupNorm, swish, conv_out to
  ``2 * z_channels`` (mean and log-variance).
- ``Decoder``: conv_in from ``z_channels``; the same middle; per level from the
  lowest, ``decoder_res_blocks`` ResnetBlocks (attention where the side is in
  ``decoder_attn_resolutions``) and a nearest-neighbour Upsample + conv; GroupNorm,
  swish, conv_out to RGB.
- ``quant_conv`` (1x1, ``2 z_channels -> 2 embed_dim``) turns the encoder output into
  the posterior moments; ``post_quant_conv`` (1x1, ``embed_dim -> z_channels``) feeds
  the decoder.
- :class:`DiagonalGaussian`: the posterior ``N(mean, exp(logvar))`` with ``logvar``
  clamped to ``[-30, 20]``.

The submodule names are LDM's, so the official KL-16 checkpoint used by MAR
(``{"model": state_dict}``) loads without renaming (:func:`load_kl16`).

A :class:`Tokenizer` bundles the autoencoder, its config and the latent ``scale``
(tokens = latent * scale, see ``docs/architecture.md``): 1/std of the training
latents for a tokenizer trained here, the ``tokenizer.checkpoint_scale`` param
(MAR: 0.2325) for KL-16. It is saved and loaded as one file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from demar.config import StrictConfig
from demar.io import UnreadableFileError, UnsafeFileError, file_sha256, torch_load, torch_save

__all__ = [
    "AttnBlock",
    "AutoencoderKL",
    "CheckpointError",
    "Decoder",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Tokenizer",
    "TokenizerConfig",
    "Upsample",
    "file_sha256",
    "load_kl16",
    "load_ldm_state_dict",
]

BUNDLE_FORMAT = "demar-tokenizer"
BUNDLE_VERSION = 1
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's clamp of the posterior log-variance


class TokenizerConfig(StrictConfig):
    """Architecture of the KL autoencoder; the defaults are MAR's KL-16.

    Attributes:
        resolution: image side the attention resolutions refer to (default 256).
        in_channels: image channels (default 3).
        ch: base width (default 128).
        ch_mult: width multiplier per level; ``len(ch_mult) - 1`` halvings (default ``(1, 1, 2, 2, 4)``).
        num_res_blocks: ResnetBlocks per encoder level (default 2).
        decoder_res_blocks: ResnetBlocks per decoder level (default 3, LDM's ``num_res_blocks + 1``).
        attn_resolutions: feature-map sides with attention in the encoder's levels (default ``(16,)``).
        decoder_attn_resolutions: the same for the decoder's levels (default ``()``).
        z_channels: channels between encoder/decoder and the 1x1 convolutions (default 16).
        embed_dim: latent channels ``C`` (default 16).
        norm_groups: GroupNorm groups (default 32).
        dropout: dropout inside the ResnetBlocks (default 0.0).
    """

    resolution: int = Field(256, ge=8)
    in_channels: int = Field(3, ge=1)
    ch: int = Field(128, ge=1)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = Field(2, ge=0)
    decoder_res_blocks: int = Field(3, ge=0)
    attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    z_channels: int = Field(16, ge=1)
    embed_dim: int = Field(16, ge=1)
    norm_groups: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        if not self.ch_mult:
            raise ValueError("ch_mult must name at least one level")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ValueError(
                    f"ch * ch_mult ({self.ch} * {mult}) must be divisible by norm_groups ({self.norm_groups})"
                )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling {self.downsample_factor}"
            )
        return self

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of square images of side ``resolution`` (default: ``self.resolution``)."""
        side = (resolution or self.resolution) // self.downsample_factor
        return (self.embed_dim, side, side)


# --------------------------------------------------------------------------- building blocks


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm - swish - conv3x3 - GroupNorm - swish - dropout - conv3x3, plus a (1x1) shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels (a 1x1 ``nin_shortcut`` when they differ).
        groups: GroupNorm groups.
        dropout: dropout probability before the second convolution (default 0.0).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, Co, H, W]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # [B, Co, H, W]
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)  # [B, Co, H, W]
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map (1x1 q, k, v, proj_out).

    Args:
        channels: feature channels.
        groups: GroupNorm groups.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        k = self.k(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        v = self.v(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        a = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C], softmax(q k^T / sqrt(C)) v
        a = a.transpose(1, 2).reshape(b, c, hh, ww)  # [B, C, H, W]
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Halve the side: zero-pad right and bottom by one, then a 3x3 stride-2 convolution.

    Args:
        channels: feature channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Double the side: nearest-neighbour upsampling, then a 3x3 convolution.

    Args:
        channels: feature channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, maybe empty), a resampler."""

    def __init__(self, c_in: int, c_out: int, blocks: int, attention: bool, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in if i == 0 else c_out, c_out, cfg.norm_groups, cfg.dropout) for i in range(blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(c_out, cfg.norm_groups) for _ in range(blocks if attention else 0))

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
        self.attn_1 = AttnBlock(channels, cfg.norm_groups)
        self.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images ``[B, 3, H, W]`` -> ``[B, 2 z_channels, H/f, W/f]`` (f = ``cfg.downsample_factor``).

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        side, c_in = cfg.resolution, cfg.ch
        for i, c_out in enumerate(widths):
            level = _Level(c_in, c_out, cfg.num_res_blocks, side in cfg.attn_resolutions, cfg)
            if i < len(widths) - 1:
                level.downsample = Downsample(c_out)
                side //= 2
            self.down.append(level)
            c_in = c_out
        self.mid = _Middle(c_in, cfg)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for level in self.down:
            h = level.run_blocks(h)  # [B, ch * mult, side, side]
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # [B, ch * mult, side / 2, side / 2]
        h = self.mid(h)  # [B, Cmax, h, w]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2 z, h, w]


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> images ``[B, 3, h f, w f]``.

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        side = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Middle(c_in, cfg)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            level = _Level(c_in, widths[i], cfg.decoder_res_blocks, side in cfg.decoder_attn_resolutions, cfg)
            if i > 0:
                level.upsample = Upsample(widths[i])
                side *= 2
            levels.insert(0, level)  # up[i] is level i, as in LDM's key layout
            c_in = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, Cmax, h, w]
        for level in reversed(self.up):
            h = level.run_blocks(h)  # [B, ch * mult, side, side]
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # [B, ch * mult, 2 side, 2 side]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, H, W]


class DiagonalGaussian:
    """The posterior ``N(mean, diag(exp(logvar)))`` from moments ``[B, 2C, h, w]`` (mean first).

    Args:
        moments: the output of ``quant_conv``; the log-variance half is clamped to ``[-30, 20]``.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, C, h, w] each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps``, ``eps ~ N(0, I)`` drawn on ``generator``'s device (default None: global RNG)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The posterior mean ``[B, C, h, w]``."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to ``N(0, I)`` per latent element ``[B, C, h, w]``."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder: ``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``.

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> posterior moments ``[B, 2C, h, w]`` (mean, then logvar, unclamped)."""
        return self.quant_conv(self.encoder(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` (about [-1, 1], not clipped)."""
        return self.decoder(self.post_quant_conv(latents))

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct from a posterior sample: ``(images [B, 3, H, W], posterior)``."""
        posterior = DiagonalGaussian(self.encode_moments(images))  # [B, C, h, w] each
        return self.decode(posterior.sample(generator)), posterior


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint does not fit the architecture; the message names the file and the keys."""


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    try:
        return torch_load(path)
    except (UnreadableFileError, UnsafeFileError) as err:
        raise CheckpointError(str(err)) from None


# Keys of LDM's training-time loss (discriminator, LPIPS, learned log-variance): not part of the autoencoder.
IGNORED_PREFIXES = ("loss.",)


def load_ldm_state_dict(model: AutoencoderKL, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load an LDM-layout state dict into ``model`` strictly; return the ignored ``loss.*`` keys.

    Args:
        model: the autoencoder to fill.
        state: parameter name -> tensor, in LDM's key layout.
        source: the file the state came from, quoted in errors.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys.
    """
    own = model.state_dict()
    ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    given = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(given)
        if tuple(given[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = [f"{source} does not fit the tokenizer architecture {model.config.model_dump()}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
                parts.append(f"  {len(keys)} {title} key(s):\n    {shown}")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(given, strict=True)
    return ignored


# --------------------------------------------------------------------------- the bundle


class Tokenizer(nn.Module):
    """An autoencoder, its config and its latent scale: images <-> scaled tokens.

    Args:
        config: the architecture.
        scale: tokens = latents * scale (1/std of the training latents, or 0.2325 for KL-16).
        meta: free-form provenance saved with the bundle (default: empty).
        model: an autoencoder of this ``config`` to wrap (default None: a freshly initialised one).
    """

    def __init__(
        self,
        config: TokenizerConfig,
        scale: float,
        meta: dict[str, Any] | None = None,
        model: AutoencoderKL | None = None,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"latent scale must be positive, got {scale}")
        if model is not None and model.config != config:
            raise ValueError("the model was built from another config than the one given")
        self.config = config
        self.scale = float(scale)
        self.meta = dict(meta or {})
        self.model = model if model is not None else AutoencoderKL(config)

    @property
    def latent_channels(self) -> int:
        """``C``, the channels of a latent (and of a token with patch size 1)."""
        return self.config.embed_dim

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> moments ``[B, 2C, h, w]`` (mean, then log-variance)."""
        return self.model.encode_moments(images)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> scaled tokens ``[B, C, h, w]``.

        Args:
            images: the images.
            generator: the generator of the posterior sample (default None: the global RNG).
            sample: draw from the posterior (default True) or take its mean.
        """
        posterior = DiagonalGaussian(self.encode_moments(images))
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents * self.scale

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled tokens ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` (about [-1, 1], not clipped)."""
        return self.model.decode(tokens / self.scale)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the bundle (format, config, scale, meta, weights) to ``path`` atomically."""
        torch_save(
            {
                "format": BUNDLE_FORMAT,
                "version": BUNDLE_VERSION,
                "config": self.config.model_dump(mode="json"),
                "scale": self.scale,
                "meta": self.meta,
                "state_dict": self.model.state_dict(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Tokenizer:
        """Read a bundle written by :meth:`save` (in eval mode).

        Args:
            path: the bundle file.
            map_location: where to put the weights (default ``"cpu"``).
        """
        path = Path(path)
        blob = _torch_load(path)
        if not isinstance(blob, dict) or blob.get("format") != BUNDLE_FORMAT:
            raise CheckpointError(f"{path} is not a tokenizer bundle (no format {BUNDLE_FORMAT!r})")
        tok = cls(TokenizerConfig.model_validate(blob["config"]), blob["scale"], blob.get("meta"))
        load_ldm_state_dict(tok.model, blob["state_dict"], str(path))
        return tok.to(map_location).eval()


def load_kl16(path: str | os.PathLike[str], config: TokenizerConfig, scale: float) -> Tokenizer:
    """Build a :class:`Tokenizer` from an official LDM/MAR checkpoint (``{"model": state_dict}``).

    Args:
        path: the checkpoint file (MAR's ``kl16.ckpt``).
        config: the architecture it was trained with (KL-16: :class:`TokenizerConfig` defaults).
        scale: the latent scale (the ``tokenizer.checkpoint_scale`` param; MAR: 0.2325).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: not a ``{"model": ...}`` dict, or keys/shapes that do not fit ``config``.
    """
    path = Path(path)
    blob = _torch_load(path)
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        keys = list(blob)[:10] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (LDM/MAR layout), found {keys}")
    tok = Tokenizer(config, scale, meta={"source": "checkpoint", "checkpoint_sha256": file_sha256(path)})
    ignored = load_ldm_state_dict(tok.model, blob["model"], str(path))
    tok.meta["ignored_keys"] = len(ignored)
    return tok.eval()
