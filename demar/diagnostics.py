"""Mechanism diagnostics of the denoising head: where it denoises, how well it judges, and what it fixes.

Three measurements on held-out clean tokens ``x [B, N, d]`` with their context, each in
eval mode and without guidance:

* :func:`denoising_by_level`: the visible tokens get noise of one injection step ``s``
  (the same noise at every ``s``); the backbone sees them as in training and the head
  returns y. For each ``s``, the mean squared error to the clean token of the input x~,
  of y and of the fused token ``w_x x~ + w_y y``. A head that denoises has y and the fused
  token below x~; at initialisation y equals x~ (``refine_out`` starts at zero).
* :func:`assessment_calibration`: the assessment branch's scores (s_x, s_y) against the
  cosine similarities they are trained to predict (paper eq. 5): Pearson correlation and
  a reliability table (mean true similarity per bin of predicted score).
* :func:`masked_loss_by_visible`: the train/inference discrepancy the paper targets. The
  backbone's diffusion loss on the masked tokens when the visible tokens are the ground
  truth, the ground truth with injected noise, or partly the model's own samples (half
  of them re-drawn by the diffusion head from z computed with those positions masked,
  as at the previous sampling step). The diffusion draws (t, eps) are the same for the
  three, so their differences are the visible tokens' effect.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from demar.backbone import gather_tokens, mask_from_orders, random_orders, scatter_tokens
from demar.config import StrictConfig
from demar.denoising_head import NoiseInjectionConfig, NoiseInjector
from demar.diffusion import GaussianDiffusion, randn
from demar.model import patchify

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from demar.model import DeMAR
    from demar.tokenizer import Tokenizer

__all__ = [
    "LEVELS",
    "DiagnosticsConfig",
    "LevelError",
    "assessment_calibration",
    "denoising_by_level",
    "held_out_tokens",
    "masked_loss_by_visible",
]

LEVELS = (0, 10, 25, 50, 100, 200, 400)
"""Default grid of injection steps s (of T = 1000; training draws s in 0..100)."""


class DiagnosticsConfig(StrictConfig):
    """The ``diagnostics`` section of params.yaml (the ``diagnose@<row>`` stage).

    Attributes:
        num_images: held-out images (the reference split's first) whose tokens are measured
            (default 512).
        levels: injection steps s of :func:`denoising_by_level` (default :data:`LEVELS`).
        mask_ratio: share of masked tokens; the visible rest are measured (default 0.5).
        bins: bins of the calibration's reliability table (default 10).
        diffusion_steps: reverse steps of the re-drawn visible tokens (default 50).
        refine_off_images: images sampled from each De. Head row with refinement off, scored
            as the evaluate stage scores (default 500; 0 skips).
        batch_size: images per forward pass (default 256).
        seed: seeds the masks, the noise and the draws (default 0).
    """

    num_images: int = Field(512, ge=2)
    levels: tuple[int, ...] = LEVELS
    mask_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    bins: int = Field(10, ge=1)
    diffusion_steps: int = Field(50, ge=2)
    refine_off_images: int = Field(500, ge=0)
    batch_size: int = Field(256, ge=1)
    seed: int = Field(0, ge=0)


@torch.no_grad()
def held_out_tokens(
    tokenizer: Tokenizer, images: Dataset, count: int, patch_size: int, *, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the first ``count`` items of ``images`` (posterior means, scaled and patchified) and their labels.

    Args:
        tokenizer: the pipeline's tokenizer.
        images: items ``(image [3, R, R] in [-1, 1], label, ...)``.
        count: how many (at most ``len(images)``).
        patch_size: the model's patch size.
        batch_size: images per encoder pass (default 256).

    Returns:
        tokens ``[count, N, d]`` and labels int64 ``[count]``.
    """
    count = min(count, len(images))
    device = next(tokenizer.model.parameters()).device
    tokens, labels = [], []
    for start in range(0, count, batch_size):
        items = [images[i] for i in range(start, min(start + batch_size, count))]
        x = torch.stack([item[0] for item in items]).to(device)  # [b, 3, R, R]
        latents = tokenizer.encode(x, sample=False)  # [b, C, h, w]
        tokens.append(patchify(latents, patch_size))  # [b, N, d]
        labels.append(torch.tensor([int(item[1]) for item in items], dtype=torch.long))
    return torch.cat(tokens), torch.cat(labels)


@dataclass(frozen=True)
class LevelError:
    """Errors at one injection step ``s`` (mean over visible tokens of ``||t - x||^2``).

    Attributes:
        level: the injection step s.
        input: error of x~, the noisy token the head is given.
        refined: error of y, the refinement branch's output.
        fused: error of the fused token used at sampling time.
        score_x, score_y: mean assessment scores of x~ and y.
        cos_x, cos_y: mean true cosine similarities of x~ and y to x.
    """

    level: int
    input: float
    refined: float
    fused: float
    score_x: float
    score_y: float
    cos_x: float
    cos_y: float

    @property
    def gain(self) -> float:
        """How much the fused token is closer to x than x~ is: ``input - fused`` (positive = denoises)."""
        return self.input - self.fused

    def as_dict(self) -> dict[str, float]:
        """The fields and the gain, for JSON."""
        return {**asdict(self), "gain": self.gain}


def _split(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random order per image -> (orders [B, N], mask [B, N] True = masked, visible positions [B, V])."""
    b, n, _ = tokens.shape
    num_masked = min(max(round(mask_ratio * n), 1), n - 1)
    orders = random_orders(b, n, generator, tokens.device)  # [B, N]
    return orders, mask_from_orders(orders, num_masked), orders[:, num_masked:]


def _no_drop(b: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(b, dtype=torch.bool, device=device)


@torch.no_grad()
def _head_outputs(
    model: DeMAR,
    tokens: torch.Tensor,
    context: torch.Tensor | None,
    levels: tuple[int, ...],
    mask_ratio: float,
    generator: torch.Generator | None,
) -> list[dict[str, torch.Tensor]]:
    """Per level: clean visible x, noisy x~, y, fused and scores (all ``[B, V, ...]``)."""
    head = model.denoising_head
    if head is None:
        raise ValueError("the model has no denoising head (only the De. Head rows have one)")
    was_training = model.training
    model.eval()
    try:
        _, mask, visible = _split(tokens, mask_ratio, generator)
        x = gather_tokens(tokens, visible)  # [B, V, d]
        eps = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # the same noise at every level
        process = GaussianDiffusion.from_config(model.cfg.diffusion)
        if model.noise_injector is not None:
            process = model.noise_injector.process
        out = []
        for s in levels:
            steps = torch.full(x.shape[:2], s, dtype=torch.long, device=x.device)  # [B, V]
            x_noisy = process.q_sample(x, steps, eps)  # [B, V, d]
            z = model.backbone(scatter_tokens(tokens, visible, x_noisy), mask, context, _no_drop(len(x), x.device))
            z_v = gather_tokens(z, visible)  # [B, V, D]
            pred = head(x_noisy, z_v)
            fused = head.refine(x_noisy, z_v)  # [B, V, d]
            out.append({"x": x, "x_noisy": x_noisy, "y": pred.refined, "fused": fused, "scores": pred.scores})
        return out
    finally:
        model.train(was_training)


def denoising_by_level(
    model: DeMAR,
    tokens: torch.Tensor,
    context: torch.Tensor | None,
    levels: tuple[int, ...] = LEVELS,
    *,
    mask_ratio: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[LevelError]:
    """Errors to the clean token of x~, y and the fused token at each injection step (see the module docstring).

    Args:
        model: a De. Head row (a model with a denoising head).
        tokens: held-out clean tokens ``[B, N, d]``.
        context: their labels ``[B]`` or text states ``[B, L, Dc]``.
        levels: injection steps s (default :data:`LEVELS`).
        mask_ratio: share of masked tokens; the rest are visible and measured (default 0.5).
        generator: source of the orders and the noise (default None: global RNG).
    """
    result = []
    for s, o in zip(levels, _head_outputs(model, tokens, context, levels, mask_ratio, generator), strict=True):
        x = o["x"]

        def err(t: torch.Tensor, x: torch.Tensor = x) -> float:
            return float(((t.float() - x.float()) ** 2).sum(-1).mean())

        result.append(
            LevelError(
                level=int(s),
                input=err(o["x_noisy"]),
                refined=err(o["y"]),
                fused=err(o["fused"]),
                score_x=float(o["scores"][..., 0].mean()),
                score_y=float(o["scores"][..., 1].mean()),
                cos_x=float(F.cosine_similarity(o["x_noisy"], x, dim=-1).mean()),
                cos_y=float(F.cosine_similarity(o["y"], x, dim=-1).mean()),
            )
        )
    return result


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def assessment_calibration(
    model: DeMAR,
    tokens: torch.Tensor,
    context: torch.Tensor | None,
    levels: tuple[int, ...] = LEVELS,
    *,
    mask_ratio: float = 0.5,
    bins: int = 10,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """The assessment scores against the true cosine similarities, over every level's tokens.

    Returns:
        ``{"pearson_x", "pearson_y", "pearson", "mean_abs_error", "bins": [{"predicted", "true",
        "count"}]}``: correlations of s_x with c_x, s_y with c_y and of both pooled, the mean
        ``|s - c|`` (the assessment loss), and the reliability table over equal-count bins of
        the pooled predicted scores.
    """
    outputs = _head_outputs(model, tokens, context, levels, mask_ratio, generator)
    s_x = torch.cat([o["scores"][..., 0].flatten() for o in outputs]).float()
    s_y = torch.cat([o["scores"][..., 1].flatten() for o in outputs]).float()
    c_x = torch.cat([F.cosine_similarity(o["x_noisy"], o["x"], dim=-1).flatten() for o in outputs]).float()
    c_y = torch.cat([F.cosine_similarity(o["y"], o["x"], dim=-1).flatten() for o in outputs]).float()
    pred, true = torch.cat([s_x, s_y]), torch.cat([c_x, c_y])
    order = torch.argsort(pred)
    table = []
    for chunk in torch.tensor_split(order, bins):
        if len(chunk):
            table.append({"predicted": float(pred[chunk].mean()), "true": float(true[chunk].mean()), "count": len(chunk)})
    return {
        "pearson_x": _pearson(s_x, c_x),
        "pearson_y": _pearson(s_y, c_y),
        "pearson": _pearson(pred, true),
        "mean_abs_error": float((pred - true).abs().mean()),
        "bins": table,
    }


@torch.no_grad()
def masked_loss_by_visible(
    model: DeMAR,
    tokens: torch.Tensor,
    context: torch.Tensor | None,
    *,
    mask_ratio: float = 0.5,
    noise: NoiseInjectionConfig | None = None,
    diffusion_steps: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """The backbone's diffusion loss on the masked tokens for three kinds of visible tokens.

    Args:
        model: any row.
        tokens: held-out clean tokens ``[B, N, d]``.
        context: their labels ``[B]`` or text states ``[B, L, Dc]``.
        mask_ratio: share of masked (scored) tokens (default 0.5).
        noise: the injected noise of ``noisy`` (default: the model's own injection, else
            :class:`NoiseInjectionConfig` defaults).
        diffusion_steps: reverse steps of the re-drawn visible tokens (default 50).
        seed: seeds the orders, the noise, the re-draws and the loss's (t, eps) draws.

    Returns:
        ``{"ground_truth", "noisy", "own_samples"}``: mean diffusion loss on the masked tokens.
    """
    was_training = model.training
    model.eval()
    try:
        device = tokens.device
        g = torch.Generator(device=device).manual_seed(seed)
        orders, mask, visible = _split(tokens, mask_ratio, g)
        masked = orders[:, : int(mask[0].sum())]  # [B, M]
        target = gather_tokens(tokens, masked)  # [B, M, d]
        b = len(tokens)
        no_drop = _no_drop(b, device)

        injector = model.noise_injector
        if injector is None or noise is not None:
            injector = NoiseInjector(noise or NoiseInjectionConfig(), model.cfg.diffusion).to(device)
        noisy = scatter_tokens(tokens, visible, injector(gather_tokens(tokens, visible), g))  # [B, N, d]

        # Own samples: half of the visible tokens re-drawn from z computed with them masked.
        redraw = visible[:, visible.shape[1] // 2 :]  # [B, R]
        mask_prev = mask.scatter(1, redraw, True)  # [B, N]
        z_prev = model.backbone(tokens, mask_prev, context, no_drop)  # [B, N, D]
        drawn = model.diffusion_head.sample(
            gather_tokens(z_prev, redraw), z_prev, num_steps=diffusion_steps, temperature=1.0, cfg=1.0, generator=g
        )  # [B, R, d]
        own = scatter_tokens(tokens, redraw, drawn.to(tokens.dtype))  # [B, N, d]

        losses = {}
        for name, x_in in (("ground_truth", tokens), ("noisy", noisy), ("own_samples", own)):
            z = model.backbone(x_in, mask, context, no_drop)  # [B, N, D]
            draws = torch.Generator(device=device).manual_seed(seed + 1)  # the same (t, eps) for the three
            loss = model.diffusion_head.loss(target, gather_tokens(z, masked), z, generator=draws)
            losses[name] = float(loss.mean())
        return losses
    finally:
        model.train(was_training)
