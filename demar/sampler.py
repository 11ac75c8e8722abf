"""Next set-of-tokens prediction: MAR's sampling loop with De-MAR's refinement (method.md, "Sampling").

Every image starts fully masked with its own random order. Step ``k = 0 .. K-1``
unmasks a set of tokens: the positions ``orders[:, len_{k+1} : len_k]`` where
``len_k`` is the number of tokens still masked before step ``k``. All images
predict the same number of tokens at a step, so the chosen tokens gather into
dense ``[B, M]`` index tensors.

Classifier-free guidance doubles the batch: rows ``[0, B)`` carry the real
context, rows ``[B, 2B)`` the model's learned null context; the diffusion head
returns the guided ``B`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from demar.backbone import gather_tokens, mask_from_orders, random_orders, scatter_tokens
from demar.config import StrictConfig
from demar.diffusion import is_guided

if TYPE_CHECKING:
    from demar.model import DeMAR

__all__ = ["SampleResult", "SampleSettings", "cfg_at_step", "masked_after_step", "sample_tokens"]


class SampleSettings(StrictConfig):
    """Knobs of one sampling run (method.md, "Sampling"; MAR's defaults).

    Args:
        num_iter: autoregressive steps K (default 64; MAR's best numbers use 256).
        diffusion_steps: steps of the respaced reverse diffusion (default 100).
        cfg: classifier-free guidance scale (default 1.0: no guidance, no batch doubling).
        cfg_schedule: ``"linear"`` (default, MAR/Muse: ``1 + (cfg - 1) (N - mask_len) / N``)
            or ``"constant"``.
        temperature: multiplies the per-step diffusion noise (default 1.0).
        refine: refine the tokens predicted at earlier steps with the denoising head at
            every step (default True, the method; De. Head rows only). False samples a De.
            Head row as MAR would, which separates the effect of refinement at inference
            from that of noise injection in training (the diagnostics stage).
        final_refinement: after the last step, run the transformer once more and refine
            every token with the denoising head (default False, as the paper).
        cache_kv: compute the transformer head's keys/values once per autoregressive
            step instead of at every diffusion step (default True).
        compile: run each diffusion step of the heads through ``torch.compile`` (default
            False). Same draws, equal results up to float rounding. The first two
            autoregressive steps pay the compilation (about 20 s at the tiny size on a CPU,
            seconds with a warm on-disk compile cache; one graph for their shape, then one
            for any number of tokens), so it pays off for long runs of the small heads,
            whose steps are dominated by per-op cost. On the CPU, torch.compile needs a
            C++ compiler.
    """

    num_iter: int = Field(64, ge=1)
    diffusion_steps: int = Field(100, ge=2)
    cfg: float = Field(1.0, ge=0.0)
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = Field(1.0, ge=0.0)
    refine: bool = True
    final_refinement: bool = False
    cache_kv: bool = True
    compile: bool = False


@dataclass
class SampleResult:
    """What :func:`sample_tokens` returns.

    Attributes:
        tokens: the sampled tokens ``[B, N, d]``.
        tokens_per_step: how many tokens each image predicted at each step (length K).
    """

    tokens: torch.Tensor
    tokens_per_step: list[int] = field(default_factory=list)


def masked_after_step(step: int, num_iter: int, seq_len: int, masked_now: int) -> int:
    """Tokens still masked after step ``step`` (method.md, sampling step 1; MAR's rule).

    ``floor(N cos(pi/2 (k+1)/K))`` clamped to ``[1, masked_now - 1]`` so that every step
    but the last leaves at least one token masked; the last step unmasks the rest.

    Args:
        step: k in ``0 .. K-1``.
        num_iter: K.
        seq_len: N.
        masked_now: tokens masked before this step.
    """
    if step >= num_iter - 1:
        return 0
    return _clamped_mask_len(step, num_iter, seq_len, masked_now)


def _clamped_mask_len(step: int, num_iter: int, seq_len: int, masked_now: int) -> int:
    ratio = math.cos(math.pi / 2 * (step + 1) / num_iter)
    return max(1, min(masked_now - 1, math.floor(seq_len * ratio)))


def cfg_at_step(settings: SampleSettings, mask_len: int, seq_len: int) -> float:
    """The guidance scale of one step: constant, or MAR's linear ``1 + (cfg - 1)(N - mask_len)/N``.

    Args:
        settings: the run's settings (``cfg``, ``cfg_schedule``).
        mask_len: MAR's clamped mask length of this step (at least 1, also at the last step).
        seq_len: N.
    """
    if settings.cfg_schedule == "constant":
        return settings.cfg
    return 1.0 + (settings.cfg - 1.0) * (seq_len - mask_len) / seq_len


def _batch_size(context: torch.Tensor | None, num_images: int | None) -> int:
    if context is not None:
        if num_images is not None and num_images != context.shape[0]:
            raise ValueError(f"num_images={num_images} disagrees with a context of {context.shape[0]} rows")
        return context.shape[0]
    if num_images is None:
        raise ValueError("unconditional sampling (context=None) needs num_images")
    return num_images


@torch.no_grad()
def sample_tokens(
    model: DeMAR,
    context: torch.Tensor | None,
    settings: SampleSettings,
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    num_images: int | None = None,
    step_callback: Callable[[int, int], None] | None = None,
) -> SampleResult:
    """Sample tokens with the next set-of-tokens loop (method.md, "Sampling", steps 1-4).

    The model is put in eval mode for the loop and restored afterwards.

    Args:
        model: the model whose backbone, diffusion head and (if present) denoising head sample.
        context: labels ``[B]``, text tokens ``[B, L, Dc]`` or ``None`` (unconditional).
        settings: steps, guidance, temperature, refinement and caching knobs.
        generator: source of the orders and the diffusion noise (default ``None``:
            torch's default generator).
        progress: show a tqdm bar over the autoregressive steps (default False).
        num_images: batch size when ``context`` is ``None`` (default ``None``).
        step_callback: called as ``step_callback(step, num_predicted)`` after each step
            (default ``None``).

    Returns:
        :class:`SampleResult` with tokens ``[B, N, d]`` and the per-step counts.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = _batch_size(context, num_images)
    n, d, num_iter = cfg.seq_len, cfg.token_dim, settings.num_iter
    if context is not None:
        context = context.to(device)
    guided = is_guided(settings.cfg) and context is not None
    backbone, diff_head, den_head = model.backbone, model.diffusion_head, model.denoising_head

    was_training = model.training
    model.eval()
    try:
        tokens = torch.zeros(b, n, d, device=device, dtype=dtype)  # [B, N, d]
        orders = random_orders(b, n, generator, device)  # [B, N]: a random order per image
        no_drop = torch.zeros(b, dtype=torch.bool, device=device)
        if guided:
            ctx_in = torch.cat([context, context], dim=0)  # [2B, ...]
            drop = torch.cat([no_drop, ~no_drop])  # [2B]: second half gets the null context
        else:
            ctx_in, drop = context, no_drop
        masked_now = n
        counts: list[int] = []
        for k in tqdm(range(num_iter), disable=not progress, desc="sampling", leave=False):
            # 1. masking ratio after this step: cos(pi/2 (k+1)/K), at least one token stays
            #    masked until the last step (MAR's clamp), the last step unmasks the rest.
            mask_len = _clamped_mask_len(k, num_iter, n, masked_now)
            masked_next = masked_after_step(k, num_iter, n, masked_now)
            mask = mask_from_orders(orders, masked_now)  # [B, N], True = still masked

            # 2. MAR transformer on the current tokens; CFG doubles the batch with the null context.
            x_in, m_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z_all = backbone(x_in, m_in, ctx_in, drop_context=drop)  # [B', N, D]

            # 3. Denoising head: refine every token predicted at an earlier step, from the
            #    conditional z (not the guided mix).
            if den_head is not None and settings.refine and masked_now < n:
                prev = orders[:, masked_now:]  # [B, n - masked_now]
                refined = den_head.refine(gather_tokens(tokens, prev), gather_tokens(z_all[:b], prev))  # [B, P, d]
                tokens = scatter_tokens(tokens, prev, refined)

            # 4. Diffusion head: sample the tokens chosen at this step.
            chosen = orders[:, masked_next:masked_now]  # [B, M]
            num_new = masked_now - masked_next
            if num_new > 0:
                step_cfg = cfg_at_step(settings, mask_len, n) if guided else 1.0
                z_rows, z_all_rows = z_all, z_all
                if guided and not is_guided(step_cfg):  # a unit scale needs the conditional half only
                    z_rows = z_all_rows = z_all[:b]
                idx = torch.cat([chosen, chosen]) if z_rows.shape[0] != b else chosen  # [B', M]
                new = diff_head.sample(
                    gather_tokens(z_rows, idx),  # [B', M, D]
                    z_all_rows,  # [B', N, D]
                    num_steps=settings.diffusion_steps,
                    temperature=settings.temperature,
                    cfg=step_cfg,
                    generator=generator,
                    cache_kv=settings.cache_kv,
                    compile=settings.compile,
                )  # [B, M, d]
                tokens = scatter_tokens(tokens, chosen, new)
            counts.append(num_new)
            if step_callback is not None:
                step_callback(k, num_new)
            masked_now = masked_next

        # Optional final refinement of every token, the last step's included (knob; paper: off).
        if settings.final_refinement and den_head is not None:
            mask = torch.zeros(b, n, dtype=torch.bool, device=device)
            z_all = backbone(tokens, mask, context, drop_context=no_drop)  # [B, N, D]
            tokens = den_head.refine(tokens, z_all)  # [B, N, d]
    finally:
        model.train(was_training)
    # 5. The tokens go to the tokenizer's decoder elsewhere.
    return SampleResult(tokens=tokens, tokens_per_step=counts)
