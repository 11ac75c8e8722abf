"""Inputs of the reports: the rows named in ``params.yaml`` and the metric files of each row.

Every row named under ``rows:`` must have its ``metrics/train/<row>.json`` and
``metrics/evaluate/<row>.json``; the rows of a Figure 4 family (ablations ``mar``
and ``demar``) must also have ``metrics/time_fid/<row>.json``. A missing file is a
:class:`MissingMetricsError` that names every missing path; a metric file that
disagrees with ``params.yaml`` about the row's ablation, size or seed is stale and
a :class:`StaleMetricsError`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demar.io import read_json
from demar.model import ABLATION_ROWS
from demar.params import Params, RowConfig, load_params
from demar.sizes import SIZES

__all__ = [
    "ABLATIONS",
    "ABLATION_LABELS",
    "FAMILIES",
    "SIZE_ORDER",
    "MissingMetricsError",
    "RowData",
    "StaleMetricsError",
    "family_of",
    "load_row_data",
    "metric_values",
    "size_key",
]

# Table 4's rows, in the paper's order, and their (transformer diffusion head, denoising head)
# switches, both from the model's own table.
ABLATIONS: tuple[str, ...] = tuple(ABLATION_ROWS)
ABLATION_LABELS: dict[str, str] = {
    "mar": "MAR",
    "diff_head": "+Diff. Head",
    "de_head": "+De. Head",
    "demar": "De-MAR (full)",
}
ABLATION_HEADS: dict[str, tuple[bool, bool]] = {
    name: (switches["diffusion_head"] == "transformer", switches["denoising_head"])
    for name, switches in ABLATION_ROWS.items()
}
# Figure 4's model families; the two partial ablations belong to none.
FAMILIES: dict[str, str] = {"mar": "MAR", "demar": "De-MAR"}
# Sizes from small to large, for sorting: the registry's order.
SIZE_ORDER: tuple[str, ...] = tuple(SIZES)


class MissingMetricsError(FileNotFoundError):
    """A row named in ``params.yaml`` lacks a metric file; the message lists every missing path."""


class StaleMetricsError(ValueError):
    """A metric file disagrees with ``params.yaml`` about its row (re-run that row's stage)."""


@dataclass(frozen=True)
class RowData:
    """Everything the stages wrote for one row.

    Args:
        name: the row's key in ``params.yaml``.
        ref: its ``rows.<name>`` entry (ablation, size, seed, guidance).
        train: the content of ``metrics/train/<row>.json``.
        evaluate: the content of ``metrics/evaluate/<row>.json``.
        time_fid: the content of ``metrics/time_fid/<row>.json``, or None (rows outside a family).
        grid: ``samples/<row>/grid.png`` if it exists, else None.
    """

    name: str
    ref: RowConfig
    train: dict[str, Any]
    evaluate: dict[str, Any]
    time_fid: dict[str, Any] | None
    grid: Path | None

    @property
    def family(self) -> str | None:
        """``"MAR"``, ``"De-MAR"`` or None."""
        return family_of(self.ref.ablation)


def family_of(ablation: str) -> str | None:
    """The Figure 4 family of an ablation (``mar`` -> MAR, ``demar`` -> De-MAR, else None)."""
    return FAMILIES.get(ablation)


def size_key(size: str) -> tuple[int, str]:
    """Sort key putting registry sizes in order and unknown sizes after them."""
    return (SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER), size)


def _check_agrees(path: Path, data: dict[str, Any], name: str, ref: RowConfig) -> None:
    expected = {"row": name, "ablation": ref.ablation, "size": ref.size, "seed": ref.seed}
    for key, want in expected.items():
        if key in data and data[key] != want:
            raise StaleMetricsError(
                f"{path} has {key}={data[key]!r} but params.yaml rows.{name} gives {want!r}: "
                "the metric file is stale, re-run the row's stages (dvc repro)"
            )


def load_row_data(
    params: Params | str | os.PathLike[str],
    metrics_dir: str | os.PathLike[str],
    samples_dir: str | os.PathLike[str],
) -> tuple[Params, list[RowData]]:
    """Read every metric file of the rows of ``params``.

    Args:
        params: the loaded params, or the params file to load (:func:`demar.params.load_params`).
        metrics_dir: the folder holding ``train/``, ``evaluate/`` and ``time_fid/``.
        samples_dir: the folder holding ``<row>/grid.png``.

    Returns:
        The params and one :class:`RowData` per row, in ``params.yaml`` order.

    Raises:
        MissingMetricsError: some metric file is missing (all of them are named).
        StaleMetricsError: a metric file disagrees with ``params.yaml``.
    """
    params_path = "params.yaml" if isinstance(params, Params) else params
    if not isinstance(params, Params):
        params = load_params(params)
    rows = params.rows
    metrics_dir, samples_dir = Path(metrics_dir), Path(samples_dir)

    missing: list[Path] = []
    for name, ref in rows.items():
        needed = ["train", "evaluate"] + (["time_fid"] if family_of(ref.ablation) else [])
        missing += [p for p in (metrics_dir / kind / f"{name}.json" for kind in needed) if not p.is_file()]
    if missing:
        listed = "\n".join(f"  {p}" for p in missing)
        raise MissingMetricsError(
            f"metric files missing for rows named in {params_path}:\n{listed}\n"
            "run the stages that write them (dvc repro) or remove the rows from params.yaml"
        )

    out = []
    for name, ref in rows.items():
        loaded: dict[str, dict[str, Any] | None] = {}
        for kind in ("train", "evaluate", "time_fid"):
            path = metrics_dir / kind / f"{name}.json"
            loaded[kind] = read_json(path) if path.is_file() else None
            if loaded[kind] is not None:
                _check_agrees(path, loaded[kind], name, ref)
        grid = samples_dir / name / "grid.png"
        out.append(
            RowData(
                name=name,
                ref=ref,
                train=loaded["train"],
                evaluate=loaded["evaluate"],
                time_fid=loaded["time_fid"],
                grid=grid if grid.is_file() else None,
            )
        )
    return params, out


def metric_values(rows: list[RowData], key: str, source: str = "evaluate") -> list[float]:
    """The finite values of ``key`` in the ``source`` metric file of ``rows`` (nulls and NaNs dropped)."""
    values = []
    for row in rows:
        v = getattr(row, source).get(key)
        if v is not None and math.isfinite(float(v)):
            values.append(float(v))
    return values
