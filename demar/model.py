"""De-MAR and its MAR baseline as one model: backbone, diffusion head, optional denoising head.

The four rows of the paper's ablation (Table 4) are the two switches of
:class:`ModelConfig`:

| row | ``diffusion_head`` | ``denoising_head`` |
|---|---|---|
| MAR | ``"mlp"`` | False |
| +Diff. Head | ``"transformer"`` | False |
| +De. Head | ``"mlp"`` | True |
| De-MAR (full) | ``"transformer"`` | True |

Training step (method.md, "Training, one batch"): mask, inject noise into the
unmasked tokens (De. Head rows), run the backbone, the diffusion loss on the
masked tokens and the denoising losses on the unmasked ones;
``loss = L_diffusion + lambda_refine loss_r + lambda_assess loss_a``.
Sampling is :func:`demar.sampler.sample_tokens`; :func:`decode_tokens` turns its tokens into pixels.

Checkpoints carry the config they were built from; :func:`load_model` rebuilds
the model from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from demar.backbone import MARBackbone, MaskingConfig, gather_tokens, scatter_tokens
from demar.config import StrictConfig, validate
from demar.denoising_head import DenoisingHead, DenoisingHeadConfig, NoiseInjectionConfig, NoiseInjector
from demar.diffusion import DiffusionConfig
from demar.diffusion_head import DiffusionHead
from demar.io import UnreadableFileError, torch_load, torch_save
from demar.mlp_head import MLPHead, MLPHeadConfig
from demar.sampler import SampleSettings, sample_tokens
from demar.sizes import get_size
from demar.transformer_head import TransformerHead, TransformerHeadConfig

if TYPE_CHECKING:
    from demar.tokenizer import Tokenizer

__all__ = [
    "ABLATION_ROWS",
    "DeMAR",
    "LossOutput",
    "ModelConfig",
    "ModelMismatchError",
    "config_differences",
    "count_params",
    "decode_tokens",
    "load_model",
    "patchify",
    "save_checkpoint",
    "unpatchify",
]

ABLATION_ROWS: dict[str, dict[str, Any]] = {
    "mar": {"diffusion_head": "mlp", "denoising_head": False},
    "diff_head": {"diffusion_head": "transformer", "denoising_head": False},
    "de_head": {"diffusion_head": "mlp", "denoising_head": True},
    "demar": {"diffusion_head": "transformer", "denoising_head": True},
}
"""The switches of Table 4's rows (MAR, +Diff. Head, +De. Head, De-MAR full)."""


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, StrictConfig):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class ModelConfig(StrictConfig):
    """Everything that defines a model. Defaults: MAR-B on ImageNet 256 (KL-16, N = 256, d = 16).

    Build one from a registered size with :meth:`from_size`.

    Args:
        token_dim: token features d = C p^2 (default 16).
        seq_len: tokens per image N (default 256).
        patch_size: latent patch size p of :func:`patchify` (default 1).
        width: backbone width D (default 768).
        encoder_depth: encoder blocks (default 12).
        decoder_depth: decoder blocks (default 12).
        num_heads: backbone attention heads (default 12).
        mlp_ratio: backbone MLP ratio (default 4.0).
        attn_dropout: backbone attention dropout (default 0.1, MAR).
        proj_dropout: backbone projection/MLP dropout (default 0.1, MAR).
        buffer_size: context buffer tokens (default 64, MAR).
        context: ``"class"`` (labels) or ``"text"`` (embeddings ``[B, L, text_dim]``) (default ``"class"``).
        num_classes: classes of the class embedding (default 1000).
        text_dim: width of the text-encoder embeddings (default 512).
        label_drop_prob: context-drop probability for CFG training (default 0.1).
        masking: training masking-ratio distribution (default MAR's truncated normal on [0.7, 1]).
        diffusion_head: ``"mlp"`` (MAR) or ``"transformer"`` (De-MAR) (default ``"mlp"``).
        denoising_head: noise injection + denoising head on (default False).
        diffusion: the diffusion of the diffusion head (default cosine, T = 1000, learn_sigma).
        mlp_head: MAR's MLP head (used when ``diffusion_head == "mlp"``).
        transformer_head: the Transformer head (used when ``diffusion_head == "transformer"``).
        noise_injection: noise on unmasked training tokens (used with ``denoising_head``).
        denoiser: the denoising head's knobs (used with ``denoising_head``).
        lambda_refine: weight of the refinement loss (default 1.0).
        lambda_assess: weight of the assessment loss (default 1.0).
    """

    token_dim: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=2)
    patch_size: int = Field(1, ge=1)
    width: int = Field(768, ge=1)
    encoder_depth: int = Field(12, ge=1)
    decoder_depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    attn_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    proj_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    buffer_size: int = Field(64, ge=1)
    context: Literal["class", "text"] = "class"
    num_classes: int = Field(1000, ge=1)
    text_dim: int = Field(512, ge=1)
    label_drop_prob: float = Field(0.1, ge=0.0, le=1.0)
    masking: MaskingConfig = MaskingConfig()
    diffusion_head: Literal["mlp", "transformer"] = "mlp"
    denoising_head: bool = False
    diffusion: DiffusionConfig = DiffusionConfig()
    mlp_head: MLPHeadConfig = MLPHeadConfig()
    transformer_head: TransformerHeadConfig = TransformerHeadConfig()
    noise_injection: NoiseInjectionConfig = NoiseInjectionConfig()
    denoiser: DenoisingHeadConfig = DenoisingHeadConfig()
    lambda_refine: float = Field(1.0, ge=0.0)
    lambda_assess: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.token_dim % (self.patch_size**2):
            raise ValueError(f"token_dim {self.token_dim} is not C * patch_size^2 (patch_size {self.patch_size})")
        if self.noise_injection.max_step >= self.diffusion.num_timesteps:
            raise ValueError(
                f"noise_injection.max_step {self.noise_injection.max_step} must be below "
                f"diffusion.num_timesteps {self.diffusion.num_timesteps}"
            )
        return self

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> ModelConfig:
        """A config of the registered ``size`` with ``overrides`` on top.

        Nested sections merge key by key, e.g.
        ``ModelConfig.from_size("tiny", diffusion_head="transformer", denoising_head=True,
        noise_injection={"max_step": 50})``.

        Args:
            size: a name of :data:`demar.sizes.SIZES` (``tiny``, ``small``, ``B``, ``L``, ``H``).
            **overrides: any :class:`ModelConfig` field (config objects or dicts for sections).
        """
        data = _deep_merge(get_size(size).model_fields(), overrides)
        return validate(cls, data, source=f"size {size!r} with overrides")

    @classmethod
    def from_section(cls, data: dict[str, Any], *, source: str = "<params>", prefix: str = "model") -> ModelConfig:
        """Build from a params section: an optional ``size`` key plus field overrides.

        Args:
            data: e.g. ``{"size": "tiny", "token_dim": 8, "seq_len": 64, "num_classes": 10}``.
            source: the file ``data`` came from, quoted in errors (default ``"<params>"``).
            prefix: the section's dotted key, quoted in errors (default ``"model"``).
        """
        data = dict(data or {})
        size = data.pop("size", None)
        base = get_size(size).model_fields() if size is not None else {}
        return validate(cls, _deep_merge(base, data), source=source, prefix=prefix)

    @property
    def latent_channels(self) -> int:
        """Latent channels C = d / p^2."""
        return self.token_dim // self.patch_size**2


@dataclass(frozen=True)
class LossOutput:
    """One training step's losses (scalars).

    Attributes:
        loss: ``diffusion + lambda_refine * refinement + lambda_assess * assessment``.
        diffusion: diffusion loss averaged over the masked tokens.
        refinement: refinement loss over the unmasked tokens (0 without the denoising head).
        assessment: assessment loss over the unmasked tokens (0 without the denoising head).
    """

    loss: torch.Tensor
    diffusion: torch.Tensor
    refinement: torch.Tensor
    assessment: torch.Tensor


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` -> tokens ``[B, (h/p)(w/p), C p p]`` (MAR's layout: row-major
    patches, each flattened channel first, then patch row, then patch column).

    Args:
        latents: ``[B, C, h, w]`` with h and w divisible by ``patch_size``.
        patch_size: p.
    """
    b, c, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
    x = latents.reshape(b, c, h // p, p, w // p, p)  # [B, C, h', p, w', p]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h', w', C, p, p]
    return x.reshape(b, (h // p) * (w // p), c * p * p)  # [B, N, d]


def unpatchify(
    tokens: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Tokens ``[B, N, C p p]`` -> latents ``[B, C, h, w]``, the inverse of :func:`patchify`.

    Args:
        tokens: ``[B, N, d]``.
        patch_size: p.
        channels: latent channels C.
        grid: ``(h/p, w/p)``; default ``None``: a square grid ``sqrt(N) x sqrt(N)``.
    """
    b, n, d = tokens.shape
    p = patch_size
    if d != channels * p * p:
        raise ValueError(f"token dim {d} != channels {channels} * patch_size^2 {p * p}")
    if grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    gh, gw = grid
    x = tokens.reshape(b, gh, gw, channels, p, p)  # [B, h', w', C, p, p]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h', p, w', p]
    return x.reshape(b, channels, gh * p, gw * p)  # [B, C, h, w]


def decode_tokens(tokens: torch.Tensor, tokenizer: Tokenizer, cfg: ModelConfig) -> torch.Tensor:
    """Sampled tokens ``[B, N, d]`` -> images ``[B, 3, H, W]`` in about [-1, 1] (method.md, sampling step 5)."""
    latents = unpatchify(tokens.float(), cfg.patch_size, cfg.latent_channels)  # [B, C, h, w]
    return tokenizer.decode(latents)  # [B, 3, H, W]


class DeMAR(nn.Module):
    """MAR backbone + diffusion head (MLP or Transformer) + optional denoising head.

    Args:
        cfg: the model config (see :class:`ModelConfig`, :meth:`ModelConfig.from_size`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = MARBackbone(
            token_dim=cfg.token_dim,
            seq_len=cfg.seq_len,
            width=cfg.width,
            encoder_depth=cfg.encoder_depth,
            decoder_depth=cfg.decoder_depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            attn_dropout=cfg.attn_dropout,
            proj_dropout=cfg.proj_dropout,
            buffer_size=cfg.buffer_size,
            context=cfg.context,
            num_classes=cfg.num_classes,
            text_dim=cfg.text_dim,
            label_drop_prob=cfg.label_drop_prob,
            masking=cfg.masking,
        )
        self.diffusion_head: DiffusionHead
        if cfg.diffusion_head == "mlp":
            self.diffusion_head = MLPHead(
                cfg.mlp_head, token_dim=cfg.token_dim, cond_dim=cfg.width, diffusion=cfg.diffusion
            )
        else:
            self.diffusion_head = TransformerHead(
                cfg.transformer_head, token_dim=cfg.token_dim, cond_dim=cfg.width, diffusion=cfg.diffusion
            )
        self.noise_injector: NoiseInjector | None = None
        self.denoising_head: DenoisingHead | None = None
        if cfg.denoising_head:
            self.noise_injector = NoiseInjector(cfg.noise_injection, cfg.diffusion)
            self.denoising_head = DenoisingHead(cfg.token_dim, cfg.width, cfg.denoiser)

    def forward(
        self, tokens: torch.Tensor, context: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> LossOutput:
        """One training step's losses (method.md, "Training, one batch", steps 1-6).

        Args:
            tokens: clean tokens ``[B, N, d]``.
            context: labels ``[B]``, text tokens ``[B, L, Dc]`` or ``None`` (null context).
            generator: source of the masking, noise injection, label drop and diffusion
                draws (default ``None``: torch's default generator). Dropout uses the global RNG.
        """
        b = tokens.shape[0]
        dev = tokens.device
        # 1. One masking ratio per batch, ceil(r N) tokens of a random order per image.
        orders, mask, num_masked = self.backbone.sample_training_mask(b, generator, dev)
        masked_idx, unmasked_idx = orders[:, :num_masked], orders[:, num_masked:]  # [B, M], [B, N - M]

        # 2. Noise injection on the unmasked tokens (De. Head rows). When every token is masked
        #    the De. Head tensors are empty but still run, so that every parameter takes part in
        #    each step's graph (DistributedDataParallel needs that).
        x_in = tokens
        if self.noise_injector is not None:
            x_clean_u = gather_tokens(tokens, unmasked_idx)  # [B, N - M, d]
            x_noisy_u = self.noise_injector(x_clean_u, generator)  # [B, N - M, d]
            x_in = scatter_tokens(tokens, unmasked_idx, x_noisy_u)  # [B, N, d]

        # 3. Backbone -> z for every position.
        z = self.backbone(x_in, mask, context, generator=generator)  # [B, N, D]

        # 5. Diffusion loss on the masked tokens, averaged over them.
        target = gather_tokens(tokens, masked_idx)  # [B, M, d]
        diffusion = self.diffusion_head.loss(target, gather_tokens(z, masked_idx), z, generator=generator).mean()

        # 4. Denoising losses on the unmasked tokens (De. Head rows).
        zero = torch.zeros((), device=dev, dtype=diffusion.dtype)
        refinement, assessment = zero, zero
        if self.denoising_head is not None:
            den = self.denoising_head.loss(x_noisy_u, gather_tokens(z, unmasked_idx), x_clean_u)  # [B, N - M] each
            count = max(den.refinement.numel(), 1)  # mean over the unmasked tokens; 0 when there are none
            refinement, assessment = den.refinement.sum() / count, den.assessment.sum() / count

        # 6. Total loss.
        loss = diffusion + self.cfg.lambda_refine * refinement + self.cfg.lambda_assess * assessment
        return LossOutput(loss=loss, diffusion=diffusion, refinement=refinement, assessment=assessment)

    def sample(
        self,
        context: torch.Tensor | None,
        settings: SampleSettings,
        generator: torch.Generator | None = None,
        progress: bool = False,
        *,
        num_images: int | None = None,
    ) -> torch.Tensor:
        """Sample tokens ``[B, N, d]`` (see :func:`demar.sampler.sample_tokens`).

        Args:
            context: labels ``[B]``, text tokens ``[B, L, Dc]`` or ``None`` (unconditional).
            settings: the sampling knobs.
            generator: source of the orders and diffusion noise (default ``None``).
            progress: show a progress bar (default False).
            num_images: batch size when ``context`` is ``None`` (default ``None``).
        """
        return sample_tokens(self, context, settings, generator, progress, num_images=num_images).tokens

    def param_counts(self) -> dict[str, int]:
        """Parameters by component: ``backbone``, ``diffusion_head``, ``denoising_head``, ``total``."""

        def count(m: nn.Module | None) -> int:
            return 0 if m is None else sum(p.numel() for p in m.parameters())

        counts = {
            "backbone": count(self.backbone),
            "diffusion_head": count(self.diffusion_head),
            "denoising_head": count(self.denoising_head),
        }
        counts["total"] = sum(counts.values())
        return counts


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """:meth:`DeMAR.param_counts` of the model ``cfg`` describes, built on the meta device (no memory, instant).

    Args:
        cfg: the model config.
    """
    with torch.device("meta"):
        return DeMAR(cfg).param_counts()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: DeMAR,
    ema_state: dict[str, torch.Tensor] | nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``{"config", "model", "model_ema", "extra"}`` atomically: tensors and plain values only.

    Args:
        path: the file to write.
        model: the (bare, non-DDP) model; its config is stored as plain values.
        ema_state: EMA weights as a state dict or a module (default ``None``: none stored).
        extra: plain values to keep beside them (step, run identity, ...) (default ``None``).
    """
    if isinstance(ema_state, nn.Module):
        ema_state = ema_state.state_dict()
    torch_save(
        {
            "config": model.cfg.model_dump(mode="json"),
            "model": model.state_dict(),
            "model_ema": ema_state,
            "extra": extra or {},
        },
        path,
    )


class ModelMismatchError(ValueError):
    """A model file was built with another config than the one expected; the message lists the differences.

    Attributes:
        path: the file.
        differences: ``"key: value in the file, expected value"`` lines (dotted keys).
    """

    def __init__(self, path: str | os.PathLike[str], differences: list[str]) -> None:
        self.path = Path(path)
        self.differences = list(differences)
        shown = "".join(f"\n  {d}" for d in differences)
        super().__init__(f"{path}: the model does not match the expected configuration:{shown}")


def config_differences(found: ModelConfig, expected: ModelConfig) -> list[str]:
    """``"key: <found>, expected <expected>"`` for every dotted key where two model configs differ."""

    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(data, dict):
            return {prefix: data}
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = flat(found.model_dump(mode="json")), flat(expected.model_dump(mode="json"))
    return [
        f"{key.rstrip('.')}: {a.get(key)!r} in the file, expected {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def load_model(
    path: str | os.PathLike[str],
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    *,
    expected: ModelConfig | None = None,
) -> DeMAR:
    """Rebuild a model from a :func:`save_checkpoint` file, in eval mode.

    Args:
        path: the checkpoint file (read with ``weights_only=True``).
        use_ema: load the EMA weights when the file holds them (default True);
            otherwise, or when it holds none, the trained weights.
        map_location: where the tensors are loaded (default ``"cpu"``).
        expected: the config the model must have (e.g. the row's); None accepts any.

    Raises:
        FileNotFoundError: there is no such file.
        demar.io.UnreadableFileError: the file is truncated, not a torch file, not a
            model file, or its weights do not fit its config.
        demar.io.UnsafeFileError: the file holds objects other than tensors and plain values.
        ModelMismatchError: the model's config differs from ``expected`` (differences listed).
    """
    ckpt = torch_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        found = ", ".join(map(repr, sorted(ckpt, key=str))) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UnreadableFileError(path, f"not a demar model file (needs 'config' and 'model' entries; found {found})")
    cfg = validate(ModelConfig, ckpt["config"], source=str(path), prefix="config")
    if expected is not None and (diffs := config_differences(cfg, expected)):
        raise ModelMismatchError(path, diffs)
    model = DeMAR(cfg)
    state = ckpt["model_ema"] if use_ema and ckpt.get("model_ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableFileError(path, f"the weights do not fit the config the file records ({first})") from None
    return model.to(map_location).eval()
