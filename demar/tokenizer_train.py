"""Training a small KL autoencoder, its latent scale and its reconstruction PSNR.

MAR ships no tokenizer training code; the embedded preset trains its own small
tokenizer here on the shapes data set:

- objective: per-pixel reconstruction error of the decoded posterior sample plus
  ``kl_weight`` times the KL divergence to N(0, I), both averaged per element
  (pixels and latent elements respectively). The default reconstruction term is
  MSE: the stage is judged by PSNR, which is a function of the MSE alone, and the
  shapes data has flat colours with sharp edges where an L1 objective's median
  behaviour buys nothing PSNR can see; with the embedded preset's budget L1 ended
  near 22 dB held-out PSNR where MSE passed 28 dB (``recon_loss: l1`` stays a knob);
- AdamW with a linear warm-up and a cosine decay to ``min_lr``; gradient clipping;
- random horizontal flips (the latent cache also stores the flipped images);
- resumable: with a ``checkpoint`` path the full state (weights, optimiser,
  step, generator state) is saved every ``checkpoint_every`` steps and a later
  call continues from it bit for bit.

After training, :func:`latent_scale` gives the scale (1 / std of posterior samples
of training images, MAR's recipe without mean subtraction) and
:func:`reconstruction_psnr` the PSNR of uint8 reconstructions on held-out images.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from demar.config import StrictConfig
from demar.data import DataConfig, open_split, split_fingerprint
from demar.images import to_uint8, to_unit
from demar.identity import code_digest
from demar.io import UnreadableFileError, torch_load, torch_save
from demar.tokenizer import AutoencoderKL, DiagonalGaussian, Tokenizer, TokenizerConfig, load_kl16

__all__ = [
    "TokenizerStageConfig",
    "TokenizerTrainConfig",
    "TrainResult",
    "build_tokenizer",
    "latent_scale",
    "reconstruction_grid",
    "reconstruction_psnr",
    "reference_images",
    "train_tokenizer",
]


class TokenizerTrainConfig(StrictConfig):
    """Training of a small tokenizer (``tokenizer.train`` in params.yaml).

    Attributes:
        steps: optimiser steps (default 1600).
        batch_size: images per step (default 32).
        lr: peak learning rate (default 2e-3).
        min_lr: learning rate at the end of the cosine decay (default 2e-5).
        warmup_steps: linear warm-up steps (default 50).
        betas: AdamW betas (default (0.9, 0.99)).
        weight_decay: AdamW weight decay (default 0.0).
        grad_clip: max gradient norm, 0 for none (default 1.0).
        kl_weight: weight of the per-element KL term (default 1e-4).
        recon_loss: ``"mse"`` or ``"l1"`` (default ``"mse"``).
        hflip: random horizontal flips (default True).
        seed: seed of the initial weights, batches, flips and posterior samples (default 0).
        scale_images: training images whose latents give the latent scale (default 4096).
        eval_batch_size: batch size of the scale and PSNR passes (default 250).
        checkpoint_every: steps between resume checkpoints when a path is given (default 500).
        log_every: steps between logged losses (default 50).
    """

    steps: int = Field(1600, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(2e-5, ge=0)
    warmup_steps: int = Field(50, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    kl_weight: float = Field(1e-4, ge=0)
    recon_loss: Literal["mse", "l1"] = "mse"
    hflip: bool = True
    seed: int = 0
    scale_images: int = Field(4096, ge=2)
    eval_batch_size: int = Field(250, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)


def _lr_at(step: int, cfg: TokenizerTrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What :func:`train_tokenizer` returns.

    Attributes:
        model: the trained autoencoder (eval mode).
        history: ``{"step", "loss", "recon", "kl", "lr"}`` rows every ``log_every`` steps.
        wall_s: seconds spent in this call's training loop.
        resumed_from: the step training resumed from (0 for a fresh start).
    """

    model: AutoencoderKL
    history: list[dict[str, float]]
    wall_s: float
    resumed_from: int


def train_tokenizer(
    arch: TokenizerConfig,
    cfg: TokenizerTrainConfig,
    images: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    checkpoint: str | os.PathLike[str] | None = None,
    fingerprint: str = "",
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train an autoencoder of architecture ``arch`` on ``images``.

    Args:
        arch: the architecture (``arch.resolution`` must be the images' side).
        cfg: the training settings.
        images: uint8 ``[N, 3, H, W]`` training images (kept in memory on the CPU; batches are drawn
            with replacement and moved to ``device``).
        device: where to train (default ``"cpu"``).
        checkpoint: resume file: loaded if present and made for the same ``fingerprint``, rewritten
            every ``cfg.checkpoint_every`` steps (default None: no resuming).
        fingerprint: identifies the data (e.g. its manifest hash); a checkpoint saved with another
            fingerprint, architecture or config is ignored (default ``""``).
        progress: show a tqdm bar (default True).
        on_log: called with each history row, e.g. to send it to MLflow (default None).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != arch.resolution:
        raise ValueError(
            f"expected uint8 [N, 3, {arch.resolution}, {arch.resolution}] images, got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    with torch.random.fork_rng(devices=[]):  # the initial weights, without touching the global RNG
        torch.manual_seed(cfg.seed)
        model = AutoencoderKL(arch).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases and norms: no weight decay
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    identity = f"{arch.model_dump_json()}|{cfg.model_dump_json()}|{fingerprint}|{code_digest('demar.tokenizer_train')}"
    state = None
    if ckpt is not None and ckpt.is_file():
        try:
            state = torch_load(ckpt, map_location=device)
        except UnreadableFileError as err:  # a truncated checkpoint: keep it for inspection, start over
            aside = ckpt.with_name(ckpt.name + ".unreadable")
            ckpt.replace(aside)
            print(f"{err}; set aside as {aside}, training from the start", file=sys.stderr)
    if state is not None and state.get("identity") != identity:
        print(f"{ckpt}: written with another config, data or code; training from the start", file=sys.stderr)
    elif state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, history = int(state["step"]), list(state["history"])

    recon_fn = F.mse_loss if cfg.recon_loss == "mse" else F.l1_loss
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="train tokenizer", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = to_unit(images[idx]).to(device)  # [B, 3, H, W] in [-1, 1]
        if cfg.hflip:
            flip = (torch.rand(cfg.batch_size, generator=gen) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = DiagonalGaussian(model.encode_moments(x))  # [B, C, h, w] each
        recon = model.decode(posterior.sample(gen))  # [B, 3, H, W]
        rec = recon_fn(recon, x)
        kl = posterior.kl().mean()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {
                "step": step + 1,
                "loss": loss.item(),
                "recon": rec.item(),
                "kl": kl.item(),
                "lr": opt.param_groups[0]["lr"],
            }
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.2f}")
            if on_log is not None:
                on_log(row)
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "step": step + 1,
                    "history": history,
                    "identity": identity,
                },
                ckpt,
            )
    return TrainResult(model.eval(), history, time.perf_counter() - t0, start)


@torch.no_grad()
def latent_scale(
    model: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 250, seed: int = 0, progress: bool = False
) -> float:
    """``1 / std`` of posterior samples of ``images`` (MAR's recipe; no mean subtraction in the tokens).

    Args:
        model: the autoencoder.
        images: uint8 ``[N, 3, H, W]`` (training images).
        batch_size: images per forward pass (default 250).
        seed: seed of the posterior samples (default 0).
        progress: show a tqdm bar (default False).
    """
    gen = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for start in tqdm(range(0, len(images), batch_size), desc="latent scale", disable=not progress):
        device = next(model.parameters()).device
        moments = model.encode_moments(to_unit(images[start : start + batch_size]).to(device))
        z = DiagonalGaussian(moments).sample(gen).double()  # [B, C, h, w]
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    var = total_sq / count - (total / count) ** 2
    return 1.0 / math.sqrt(var)


@torch.no_grad()
def reconstruction_psnr(
    tokenizer: Tokenizer,
    images: torch.Tensor,
    *,
    batch_size: int = 250,
    sample: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """PSNR (dB) of uint8 reconstructions of ``images`` through encode -> tokens -> decode.

    Args:
        tokenizer: the tokenizer (its scale is applied and undone, as in generation).
        images: uint8 ``[N, 3, H, W]`` held-out images.
        batch_size: images per forward pass (default 250).
        sample: decode a posterior sample instead of the mean (default False).
        seed: seed of the posterior samples when ``sample`` (default 0).
        progress: show a tqdm bar (default False).

    Returns:
        ``{"psnr": 10 log10(255^2 / MSE over all pixels), "psnr_image_mean": mean per-image PSNR,
        "mse": MSE in [0, 255] units}``.
    """
    gen = torch.Generator().manual_seed(seed)
    sq_err, per_image = 0.0, []
    for start in tqdm(range(0, len(images), batch_size), desc="psnr", disable=not progress):
        x = images[start : start + batch_size]
        device = next(tokenizer.parameters()).device
        tokens = tokenizer.encode(to_unit(x).to(device), generator=gen, sample=sample)
        y = to_uint8(tokenizer.decode(tokens).cpu()).float()  # as saved to uint8
        err = (y - x.float()).pow(2).flatten(1).mean(1)  # [B] per-image MSE
        sq_err += err.sum().item()
        per_image.append(10.0 * torch.log10(255.0**2 / err.clamp_min(1e-3)))
    mse = sq_err / len(images)
    return {
        "psnr": 10.0 * math.log10(255.0**2 / max(mse, 1e-3)),
        "psnr_image_mean": torch.cat(per_image).mean().item(),
        "mse": mse,
    }


# --------------------------------------------------------------------------- the tokenizer stage


class TokenizerStageConfig(StrictConfig):
    """The ``tokenizer`` section of params.yaml: train a small tokenizer or load KL-16.

    Attributes:
        source: ``"train"`` (train ``architecture`` on the embedded data) or ``"checkpoint"``
            (load an official LDM/MAR checkpoint of ``architecture``) (default ``"train"``).
        checkpoint: the checkpoint file for ``source: checkpoint`` (default None).
        checkpoint_scale: the latent scale of that checkpoint (default 0.2325, MAR's KL-16).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (default ``"auto"``).
        eval_images: held-out (reference) images whose reconstruction PSNR is measured, 0 for none
            (default 1000).
        architecture: the autoencoder (default: KL-16).
        train: the training settings for ``source: train``.
    """

    source: Literal["train", "checkpoint"] = "train"
    checkpoint: str | None = None
    checkpoint_scale: float = Field(0.2325, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_images: int = Field(1000, ge=0)
    architecture: TokenizerConfig = TokenizerConfig()
    train: TokenizerTrainConfig = TokenizerTrainConfig()

    @model_validator(mode="after")
    def _checkpoint_given(self) -> TokenizerStageConfig:
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("tokenizer.source is 'checkpoint' but tokenizer.checkpoint is not set")
        return self


def reference_images(data_cfg: DataConfig, data_dir: str | os.PathLike[str], num: int) -> torch.Tensor | None:
    """Up to ``num`` evenly spaced held-out images as uint8 ``[n, 3, R, R]``, or None without a reference split.

    Args:
        data_cfg: the data config.
        data_dir: the prepared data folder.
        num: how many images at most.
    """
    root = Path(data_dir) / "reference"
    if num <= 0 or not (root.is_dir() and any(root.iterdir())):
        return None
    ds = open_split(data_cfg, data_dir, "reference")
    picks = torch.linspace(0, len(ds) - 1, min(num, len(ds))).round().long().unique().tolist()
    if data_cfg.kind == "embedded":
        return torch.from_numpy(np.asarray(ds.images[picks]))
    return torch.stack([to_uint8(ds[i][0]) for i in picks])


def build_tokenizer(
    cfg: TokenizerStageConfig,
    data_cfg: DataConfig,
    data_dir: str | os.PathLike[str],
    *,
    resume: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer stage: train (embedded data) or load (KL-16) a tokenizer, then measure it.

    Args:
        cfg: the ``tokenizer`` section.
        data_cfg: the ``data`` section.
        data_dir: the prepared data folder (``train/``, ``reference/``).
        resume: resume file of the training (default None: no resuming).
        progress: show tqdm bars (default True).
        on_log: called with each training history row (default None).

    Returns:
        ``(tokenizer on the CPU, metrics)``; metrics hold ``source, scale, latent_shape, params,
        psnr, psnr_image_mean, psnr_sample, eval_images, threads, wall_s`` and, when trained,
        ``train_steps, train_wall_s, final_loss, final_recon, final_kl``.
    """
    from demar.distributed import resolve_device

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    arch = cfg.architecture
    if arch.resolution != data_cfg.resolution:
        raise ValueError(
            f"tokenizer.architecture.resolution ({arch.resolution}) differs from the data's "
            f"resolution ({data_cfg.resolution})"
        )
    metrics: dict[str, Any] = {"source": cfg.source}
    if cfg.source == "checkpoint":
        tok = load_kl16(cfg.checkpoint, arch, cfg.checkpoint_scale)
    else:
        if data_cfg.kind != "embedded":
            raise ValueError("tokenizer.source 'train' needs data.kind 'embedded'; use 'checkpoint' for image folders")
        images = torch.from_numpy(np.load(Path(data_dir) / "train" / "images.npy"))  # uint8 [N, 3, R, R]
        fingerprint = split_fingerprint(data_dir, "train")["sha256"]
        result = train_tokenizer(
            arch,
            cfg.train,
            images,
            device=device,
            checkpoint=resume,
            fingerprint=fingerprint,
            progress=progress,
            on_log=on_log,
        )
        scale = latent_scale(
            result.model, images[: cfg.train.scale_images], batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed
        )
        tok = Tokenizer(arch, scale, meta={"source": "trained", "data_sha256": fingerprint}, model=result.model)
        last = result.history[-1]
        metrics.update(
            train_steps=cfg.train.steps,
            train_wall_s=result.wall_s,
            resumed_from=result.resumed_from,
            final_loss=last["loss"],
            final_recon=last["recon"],
            final_kl=last["kl"],
        )
    tok = tok.to(device).eval()
    ref = reference_images(data_cfg, data_dir, cfg.eval_images)
    metrics.update(psnr=None, psnr_image_mean=None, psnr_sample=None, eval_images=0)
    if ref is not None:
        bs = cfg.train.eval_batch_size
        mean = reconstruction_psnr(tok, ref, batch_size=bs, progress=progress)
        drawn = reconstruction_psnr(tok, ref, batch_size=bs, sample=True, seed=cfg.train.seed)
        metrics.update(
            psnr=mean["psnr"], psnr_image_mean=mean["psnr_image_mean"], psnr_sample=drawn["psnr"], eval_images=len(ref)
        )
        tok.meta["psnr"] = mean["psnr"]
    metrics.update(
        scale=tok.scale,
        latent_shape=list(arch.latent_shape()),
        params=sum(p.numel() for p in tok.parameters()),
        threads=torch.get_num_threads(),  # CPU results are bitwise the same only under the same count
        wall_s=time.perf_counter() - t0,
    )
    return tok.cpu(), metrics


@torch.no_grad()
def reconstruction_grid(tokenizer: Tokenizer, images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """A uint8 ``[H', W', 3]`` picture: rows of originals, each followed by its reconstruction row.

    Args:
        tokenizer: the tokenizer.
        images: uint8 ``[n, 3, R, R]`` with ``n`` a multiple of ``columns``.
        columns: images per row (default 8).
    """
    device = next(tokenizer.parameters()).device
    recon = to_uint8(tokenizer.decode(tokenizer.encode(to_unit(images).to(device), sample=False)).cpu())
    n, _, r, _ = images.shape
    rows = n // columns
    pairs = torch.stack([images[: rows * columns], recon[: rows * columns]]).reshape(2, rows, columns, 3, r, r)
    grid = pairs.permute(1, 0, 4, 2, 5, 3).reshape(rows * 2 * r, columns * r, 3)  # [2 rows R, cols R, 3]
    return grid.numpy()
