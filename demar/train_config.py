"""The hyperparameters of a training run and the schedule they define.

:class:`TrainConfig` is ``params.yaml``'s ``train`` section; :func:`steps_for` turns it
into a number of steps and :func:`lr_at` into MAR's per-step learning rate.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from demar.config import StrictConfig
from demar.sampler import SampleSettings

__all__ = ["LR_REFERENCE_BATCH", "OPERATIONAL_KEYS", "TrainConfig", "lr_at", "steps_for"]

# Keys of TrainConfig that may differ between a checkpoint and the run resuming it:
# they change when things are written, what is logged or how much memory a step
# takes, never the weights. (``device`` is compared as resolved, cpu or cuda;
# ``compile`` and ``bf16`` change the arithmetic, so they are not operational.)
OPERATIONAL_KEYS = frozenset(
    {
        "checkpoint_every",
        "log_every",
        "sample_every",
        "sample_count",
        "sample_settings",
        "num_workers",
        "grad_checkpointing",
        "device",
    }
)

# Learning rates are quoted per 256 images (MAR: lr = base_lr * batch / 256).
LR_REFERENCE_BATCH = 256


class TrainConfig(StrictConfig):
    """Hyperparameters of one training run (``params.yaml``, section ``train``).

    Defaults are MAR's ImageNet 256 recipe; the embedded CPU preset overrides them.

    Args:
        batch_size: global batch, images per optimizer step over all processes (default 2048).
        micro_batches: slices the global batch is cut into, each one forward/backward
            with its own random draws (the masking ratio is drawn once per slice); a
            multiple of the number of processes, which each accumulate
            ``micro_batches / world_size`` slices. None: one slice per process (MAR:
            one batch per GPU), so the draws depend on the number of processes; a
            number makes results independent of it and allows gradient accumulation
            (default None).
        base_lr: learning rate per 256 images; the AdamW rate is
            ``base_lr * batch_size / 256`` (default 1e-4, i.e. 8e-4 at batch 2048).
        weight_decay: AdamW decay of matrices (none on biases, 1-D parameters or the
            diffusion head, as MAR) (default 0.02).
        betas: AdamW betas (default (0.9, 0.95)).
        epochs: training length in passes over the latent set; the number of steps is
            ``round(epochs * num_images / batch_size)`` (default 400).
        warmup_epochs: linear warm-up of the learning rate from 0, in epochs (default 100).
        lr_schedule: after warm-up, ``"constant"`` (MAR) or ``"cosine"`` down to ``min_lr``
            (default ``"constant"``).
        min_lr: final learning rate of the cosine schedule (default 0.0).
        grad_clip: maximum global gradient norm; 0 turns clipping off (default 3.0).
        ema_rate: EMA decay per step, updated every step from the initial weights
            (default 0.9999).
        checkpoint_every: steps between checkpoints (plus one at the end) (default 5000).
        log_every: steps per logged record; each record averages the steps since the
            previous one (default 100).
        sample_every: steps between sample grids logged as MLflow images; 0 = never
            (needs a decoder) (default 0).
        sample_count: images in a sample grid (default 16).
        sample_settings: sampler knobs of the grids (:class:`demar.sampler.SampleSettings`;
            default MAR's: 64 autoregressive steps, 100 diffusion steps, no guidance).
        num_workers: DataLoader worker processes (default 4).
        seed: seed of every random draw of the run (default 0).
        bf16: bf16 autocast of forward passes on CUDA devices (never on the CPU,
            never fp16) (default True).
        grad_checkpointing: recompute transformer block activations in the backward
            pass to save memory (default False).
        compile: ``torch.compile`` the model (default False).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"`` (default ``"auto"``).
    """

    batch_size: int = Field(2048, ge=1)
    micro_batches: int | None = Field(None, ge=1)
    base_lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.02, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: float = Field(400.0, gt=0.0)
    warmup_epochs: float = Field(100.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(3.0, ge=0.0)
    ema_rate: float = Field(0.9999, ge=0.0, le=1.0)
    checkpoint_every: int = Field(5000, ge=1)
    log_every: int = Field(100, ge=1)
    sample_every: int = Field(0, ge=0)
    sample_count: int = Field(16, ge=1)
    sample_settings: SampleSettings = SampleSettings()
    num_workers: int = Field(4, ge=0)
    seed: int = Field(0, ge=0)
    bf16: bool = True
    grad_checkpointing: bool = False
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must lie in [0, 1), got {b}")
        return betas

    @field_validator("micro_batches")
    @classmethod
    def _check_micro_batches(cls, micro_batches: int | None, info: ValidationInfo) -> int | None:
        batch = info.data.get("batch_size")
        if micro_batches is not None and batch is not None and batch % micro_batches:
            raise ValueError(f"must divide batch_size ({batch}), got {micro_batches}")
        return micro_batches

    @field_validator("warmup_epochs")
    @classmethod
    def _check_warmup(cls, warmup: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if epochs is not None and warmup > epochs:
            raise ValueError(f"must not exceed epochs ({epochs}), got {warmup}")
        return warmup

    @field_validator("min_lr")
    @classmethod
    def _check_min_lr(cls, min_lr: float, info: ValidationInfo) -> float:
        base, batch = info.data.get("base_lr"), info.data.get("batch_size")
        if base is not None and batch is not None and min_lr > base * batch / LR_REFERENCE_BATCH:
            raise ValueError(f"must not exceed the learning rate base_lr * batch_size / 256, got {min_lr}")
        return min_lr

    @property
    def lr(self) -> float:
        """The AdamW learning rate after warm-up: ``base_lr * batch_size / 256``."""
        return self.base_lr * self.batch_size / LR_REFERENCE_BATCH


def steps_for(cfg: TrainConfig, num_images: int) -> tuple[int, float]:
    """``(total steps, warm-up steps)`` of a run over ``num_images`` images.

    Args:
        cfg: the training config (``epochs``, ``warmup_epochs``, ``batch_size``).
        num_images: images in the latent set.
    """
    steps_per_epoch = num_images / cfg.batch_size
    return max(1, round(cfg.epochs * steps_per_epoch)), cfg.warmup_epochs * steps_per_epoch


def lr_at(step: int, cfg: TrainConfig, total_steps: int, warmup_steps: float) -> float:
    """The learning rate of the 0-based ``step`` (MAR's per-iteration schedule).

    Linear warm-up from 0 over ``warmup_steps``, then ``cfg.lr`` (constant) or a
    half-cosine from ``cfg.lr`` to ``cfg.min_lr`` at ``total_steps``.

    Args:
        step: 0-based optimizer step.
        cfg: the training config.
        total_steps: steps of the whole run.
        warmup_steps: steps of warm-up (may be fractional).
    """
    if step < warmup_steps:
        return cfg.lr * step / warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1e-12)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
