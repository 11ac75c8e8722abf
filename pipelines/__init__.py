"""One thin script per DVC stage: read params and paths, call the library, write outputs and metrics."""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["add_threads_argument", "apply_threads", "stage_settings"]


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads N``: torch CPU threads of the stage (default ``$OMP_NUM_THREADS``, else torch's)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else torch's default)",
    )


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads to ``threads`` (or ``$OMP_NUM_THREADS``); ``None`` and unset leave torch's default."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {threads})")
        torch.set_num_threads(threads)


def stage_settings(params: dict[str, Any], source: str) -> tuple[str, Any]:
    """Validate the whole params file and return the ``preset`` name and the ``tracking`` section.

    Every stage calls this before any work, so an unknown key or an invalid value
    anywhere in ``params.yaml`` stops every stage with a message naming the key.

    Args:
        params: the whole params file as a mapping (already read from ``source``).
        source: its path, quoted in errors.

    Returns:
        ``(preset, tracking)`` with ``tracking.enabled`` and ``tracking.system_metrics``.
    """
    from demar.params import load_params

    del params  # validated again from the file itself, with every section's model
    validated = load_params(source)
    return validated.preset, validated.tracking
