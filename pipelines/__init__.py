"""One thin script per DVC stage: read params and paths, call the library, write outputs and metrics."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from demar.params import Params

__all__ = ["add_threads_argument", "apply_threads", "load_stage_params", "run_stage"]


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


def load_stage_params(path: str | os.PathLike[str]) -> Params:
    """Read and validate the whole params file once, before any work; the stage hands its sections down.

    An unknown key or an invalid value anywhere in the file stops every stage with a
    :class:`demar.config.ConfigError` naming the key (see :func:`demar.params.load_params`).
    """
    from demar.params import load_params

    return load_params(path)


def run_stage(main: Callable[[], int], name: str) -> NoReturn:
    """Exit with ``main()``'s status; an error the user must fix is one line on stderr and status 2.

    Every stage script ends with ``run_stage(main, "<stage>")``. A configuration error, an
    unreadable, unsafe or mismatched file and an unwritable output are the user's to fix,
    so each reads as one message naming the key or the file, not as a traceback.
    """
    from demar.config import ConfigError
    from demar.io import UnreadableFileError, UnsafeFileError
    from demar.model import ModelMismatchError

    try:
        status = main()
    except (ConfigError, UnreadableFileError, UnsafeFileError, ModelMismatchError, PermissionError) as err:
        head, *rest = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        print(f"{name}: error: {head} {'; '.join(rest)}".rstrip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(status)
