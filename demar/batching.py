"""The data order of training: which images each slice of each step reads.

See :class:`StepBatchSampler`: the order is a function of ``(seed, step, slice)``
alone, so a resumed run or a run on another number of processes reads the same
images in the same slices.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from demar.rng import derive_seed

__all__ = ["StepBatchSampler"]


class StepBatchSampler(Sampler[list]):
    """The indices of every slice this process handles, step by step, from ``start_step``.

    The images of step ``s`` are positions ``[s * B, (s + 1) * B)`` of an endless
    stream made of one random permutation of the data set per epoch (epoch ``e``
    shuffled by ``derive_seed(seed, "order", e)``). Slice ``m`` of a step holds
    positions ``[m * b, (m + 1) * b)`` of it, ``b = B / micro_batches``; process
    ``r`` handles slices ``r * k .. (r + 1) * k - 1``, ``k = micro_batches / W``.
    Everything is a function of ``(seed, step, slice)``, so a resumed or
    differently parallel run reads the same images in the same slices.

    Args:
        num_images: size of the data set.
        batch_size: global batch B.
        micro_batches: slices per step.
        rank: this process's rank.
        world_size: number of processes (divides ``micro_batches``).
        seed: the run's seed.
        total_steps: one past the last step to yield.
        start_step: first step to yield (default 0).
        with_epoch: yield ``(index, epoch)`` pairs instead of indices (default False).
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        micro_batches: int,
        rank: int,
        world_size: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        with_epoch: bool = False,
    ) -> None:
        if num_images < 1:
            raise ValueError("the latent set is empty")
        self.n = num_images
        self.batch_size = batch_size
        self.slice_size = batch_size // micro_batches
        self.local = micro_batches // world_size
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self.total_steps = total_steps
        self.with_epoch = with_epoch
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def _positions(self, step: int, slice_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = step * self.batch_size + slice_index * self.slice_size
        pos = torch.arange(start, start + self.slice_size)  # positions in the endless stream
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[pos[sel] % self.n]
        return out, epochs

    def indices(self, step: int, slice_index: int) -> list[int]:
        """Data set indices of slice ``slice_index`` of ``step``.

        Args:
            step: 0-based step.
            slice_index: global slice index in ``[0, micro_batches)``.
        """
        return self._positions(step, slice_index)[0].tolist()

    def keys(self, step: int, slice_index: int) -> list[tuple[int, int]]:
        """``(index, epoch)`` of every image of the slice: for data sets that draw per epoch."""
        indices, epochs = self._positions(step, slice_index)
        return list(zip(indices.tolist(), epochs.tolist()))

    def slices(self) -> list[int]:
        """Global indices of the slices this process handles each step."""
        return [self.rank * self.local + a for a in range(self.local)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            for m in self.slices():
                yield self.keys(step, m) if self.with_epoch else self.indices(step, m)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.local
