"""Exponential moving average of a model's weights (MAR's EMA).

As MAR (``mar-reference.md``, "Training recipe"): the average starts from the
initial weights and is updated after every optimizer step,
``ema <- rate * ema + (1 - rate) * w``, for every parameter. Buffers are not
averaged; they are copied from the trained model at each update.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """A frozen copy of a model whose parameters follow the trained ones on average.

    Args:
        model: the bare model being trained (not a DDP wrapper); its current weights
            are the starting point.
        rate: the decay per update, in ``[0, 1]`` (MAR: 0.9999); 0 copies the
            weights, 1 keeps the initial ones.
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"EMA rate must lie in [0, 1], got {rate}")
        self.rate = rate
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s weights.

        Args:
            model: the bare trained model (same architecture as :attr:`module`).
        """
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(ema_params, self.rate)
        torch._foreach_add_(ema_params, params, alpha=1.0 - self.rate)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average from :meth:`state_dict`.

        Args:
            state: a state dict of the averaged model.
        """
        self.module.load_state_dict(state)
