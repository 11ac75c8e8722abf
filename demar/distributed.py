"""Multi-process training with ``torchrun``: process group, devices, reductions, DDP.

A training script runs unchanged on one process or under ``torchrun``: the
launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR`` /
``MASTER_PORT``) and :func:`init_distributed` picks them up. The backend is NCCL
when training on CUDA devices and gloo on the CPU; each process drives the GPU
``cuda:<LOCAL_RANK>``.

One node, 8 GPUs::

    torchrun --nproc_per_node 8 pipelines/train.py --row demar

Several nodes: start the same command on every node with torchrun's rendezvous
arguments (the first node's address as the endpoint, one job id for all)::

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint <host of node 0>:29400 --rdzv_id demar-b \\
        pipelines/train.py --row demar

The global batch is ``train.batch_size`` whatever the number of processes: each of
the ``W`` processes handles ``batch_size / W`` images a step (see
:mod:`demar.train` for how the batch is split so that results do not depend on
``W``). Only rank 0 writes files, logs to MLflow and shows a progress bar.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "all_reduce_max",
    "all_reduce_mean",
    "barrier",
    "init_distributed",
    "resolve_device",
    "teardown",
    "unwrap",
    "wrap_ddp",
]

DevicePref = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a (possibly single-process) training job.

    Attributes:
        rank: global rank of this process (0 on a single process).
        world_size: number of processes (1 on a single process).
        local_rank: rank on this node, the index of its GPU.
        device: the device this process trains on.
        owns_group: whether :func:`init_distributed` created the process group
            (and :func:`teardown` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files, logs and shows progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def resolve_device(pref: DevicePref = "auto", local_rank: int = 0) -> torch.device:
    """The training device of one process.

    Args:
        pref: ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``
            (an error without a CUDA device). Default ``"auto"``.
        local_rank: this process's rank on its node, the index of its GPU (default 0).
    """
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: DevicePref = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the ``torchrun`` process group named by the environment, or run alone.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them (or with
    ``WORLD_SIZE=1``) returns a single-process :class:`DistEnv`. A process group that
    is already initialised is reused (and left alone by :func:`teardown`).

    Args:
        device: the device preference of :func:`resolve_device` (default ``"auto"``).
        timeout_s: how long collectives wait for the other processes, seconds (default 1800).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    if world_size <= 1:
        return DistEnv(0, 1, 0, dev, owns_group=False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=dev if dev.type == "cuda" else None,
    )
    return DistEnv(rank, world_size, local_rank, dev, owns_group=True)


def teardown(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it.

    Args:
        env: the environment returned by :func:`init_distributed`.
    """
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait until every process gets here (nothing on a single process).

    Args:
        env: the current :class:`DistEnv`.
    """
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``values`` over all processes (a new tensor; ``values`` unchanged).

    Args:
        values: a float tensor on ``env.device``, the same shape on every process.
        env: the current :class:`DistEnv`.
    """
    out = values.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= env.world_size
    return out


def all_reduce_max(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise maximum of ``values`` over all processes (a new tensor).

    Args:
        values: a tensor on ``env.device``, the same shape on every process.
        env: the current :class:`DistEnv`.
    """
    out = values.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def wrap_ddp(model: nn.Module, env: DistEnv, *, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when several processes train it.

    DDP averages the gradients of all processes during the backward pass; it
    broadcasts rank 0's parameters and buffers at construction, so every process
    starts from the same weights.

    Args:
        model: the bare model, already on ``env.device``.
        env: the current :class:`DistEnv`; a single process gets ``model`` back unchanged.
        find_unused_parameters: let DDP skip parameters that get no gradient in a step
            (costs an extra graph traversal a step; only for models that need it,
            default False).
    """
    if not env.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP and/or ``torch.compile`` wrappers.

    Args:
        model: a module, possibly wrapped.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
