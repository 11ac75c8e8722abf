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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from demar.config import ConfigError, load_yaml, validate
from demar.io import read_json
from demar.model import ABLATION_ROWS
from demar.sizes import SIZES

__all__ = [
    "ABLATIONS",
    "ABLATION_LABELS",
    "FAMILIES",
    "SIZE_ORDER",
    "MissingMetricsError",
    "RowData",
    "RowRef",
    "StaleMetricsError",
    "family_of",
    "load_row_data",
    "load_rows",
    "metric_values",
    "size_key",
]

Ablation = Literal["mar", "diff_head", "de_head", "demar"]

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


class RowRef(BaseModel):
    """The keys of one ``rows.<name>`` entry that the reports read.

    The full schema of a row belongs to the stages that consume it; the reports
    ignore the other keys.

    Args:
        ablation: one of ``mar``, ``diff_head``, ``de_head``, ``demar``.
        size: a size of the registry (``tiny``, ``small``, ``B``, ``L``, ``H``).
        seed: the row's seed.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    ablation: Ablation
    size: str
    seed: int


@dataclass(frozen=True)
class RowData:
    """Everything the stages wrote for one row.

    Args:
        name: the row's key in ``params.yaml``.
        ref: its ablation, size and seed.
        train: the content of ``metrics/train/<row>.json``.
        evaluate: the content of ``metrics/evaluate/<row>.json``.
        time_fid: the content of ``metrics/time_fid/<row>.json``, or None (rows outside a family).
        grid: ``samples/<row>/grid.png`` if it exists, else None.
    """

    name: str
    ref: RowRef
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


def load_rows(params: dict[str, Any], source: str = "params.yaml") -> dict[str, RowRef]:
    """Validate the ``rows:`` mapping of a loaded ``params.yaml``.

    Args:
        params: the whole params mapping.
        source: the file it came from, quoted in errors (default ``"params.yaml"``).
    """
    rows = params.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise ConfigError(f"{source}: 'rows' must be a non-empty mapping of row name -> row entry")
    return {str(name): validate(RowRef, entry, source=source, prefix=f"rows.{name}") for name, entry in rows.items()}


def _check_agrees(path: Path, data: dict[str, Any], name: str, ref: RowRef) -> None:
    expected = {"row": name, "ablation": ref.ablation, "size": ref.size, "seed": ref.seed}
    for key, want in expected.items():
        if key in data and data[key] != want:
            raise StaleMetricsError(
                f"{path} has {key}={data[key]!r} but params.yaml rows.{name} gives {want!r}: "
                "the metric file is stale, re-run the row's stages (dvc repro)"
            )


def load_row_data(
    params_path: str | os.PathLike[str],
    metrics_dir: str | os.PathLike[str],
    samples_dir: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[RowData]]:
    """Read ``params.yaml`` and every metric file of its rows.

    Args:
        params_path: ``params.yaml``.
        metrics_dir: the folder holding ``train/``, ``evaluate/`` and ``time_fid/``.
        samples_dir: the folder holding ``<row>/grid.png``.

    Returns:
        The params mapping and one :class:`RowData` per row, in ``params.yaml`` order.

    Raises:
        MissingMetricsError: some metric file is missing (all of them are named).
        StaleMetricsError: a metric file disagrees with ``params.yaml``.
    """
    params = load_yaml(params_path)
    rows = load_rows(params, str(params_path))
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
