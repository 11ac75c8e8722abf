"""One thin script per DVC stage: read params and paths, call the library, write outputs and metrics."""

from __future__ import annotations

from typing import Any

from demar.config import ConfigError, validate

__all__ = ["add_threads_argument", "apply_threads", "stage_settings"]


def stage_settings(params: dict[str, Any], source: str) -> tuple[str, Any]:
    """The ``preset`` name and the validated ``tracking`` section shared by every stage.

    Args:
        params: the whole params file as a mapping.
        source: its path, quoted in errors.

    Returns:
        ``(preset, tracking)`` with ``tracking.enabled`` and ``tracking.system_metrics``.
    """
    from pipelines.train import DEFAULT_PRESET, TrackingConfig  # imported here: `-m pipelines.train` stays clean

    preset = params.get("preset", DEFAULT_PRESET)
    if not isinstance(preset, str) or not preset:
        raise ConfigError(f"invalid configuration in {source}:\n  preset: must be a non-empty string (got {preset!r})")
    return preset, validate(TrackingConfig, params.get("tracking"), source=source, prefix="tracking")


def add_threads_argument(parser: Any) -> None:
    """Add ``--threads N`` (CPU threads of torch; 0 keeps torch's default) to an argparse parser."""
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch, 0 = torch's default (on a busy 2-core machine 1 is fastest for small models)",
    )


def apply_threads(threads: int) -> None:
    """Set torch's CPU thread count when ``threads`` > 0."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
