"""Figure 4 of the paper (computational cost vs FID) from our rows, and training curves.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state,
no display needed) and written as PNG and SVG.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from demar.io import atomic_write_bytes, atomic_write_text
from reports.data import FAMILIES, RowData, metric_values, size_key
from reports.stats import summarize

__all__ = [
    "FAMILY_COLORS",
    "figure4a",
    "figure4b",
    "save_figure",
    "time_fid_curves",
    "training_curves",
    "write_plot_data",
]

FAMILY_COLORS = {"MAR": "tab:blue", "De-MAR": "tab:red"}
MARKERS = ("o", "s", "^", "D", "v")


def _new_figure(ncols: int = 1) -> Figure:
    fig = Figure(figsize=(5.2 * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plain_log_x(ax) -> None:
    """Log x axis labelled with plain numbers: every decade, and 2x and 5x in between."""

    def minor(v: float, _pos: int) -> str:
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def time_fid_curves(
    rows: list[RowData], confidence: float = 0.95
) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """Per (family, size): the (sec_per_image, FID, FID error) points of ``metrics/time_fid``, by time.

    Points with the same (ar_steps, diffusion_steps) in several seeds are averaged; the
    error is the half-width of FID's t-interval over those seeds (0 with one seed).
    """
    # (family, size) -> (ar_steps, diffusion_steps) -> [(seconds, FID) per seed]
    acc: dict[tuple[str, str], dict[tuple[int, int], list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.family is None or row.time_fid is None:
            continue
        for pt in row.time_fid.get("points", []):
            sec, fid = pt.get("sec_per_image"), pt.get("fid")
            if sec is None or fid is None or not (math.isfinite(sec) and math.isfinite(fid)):
                continue
            acc[(row.family, row.ref.size)][(pt["ar_steps"], pt["diffusion_steps"])].append((sec, fid))
    curves = {}
    for key, settings in acc.items():
        pts = []
        for v in settings.values():
            s = summarize([f for _, f in v], confidence)
            pts.append((sum(t for t, _ in v) / len(v), s.mean, (s.ci_high - s.mean) if s.has_interval else 0.0))
        curves[key] = sorted(pts)
    return curves


def _family_sort(key: tuple[str, str]) -> tuple[int, tuple[int, str]]:
    return (list(FAMILIES.values()).index(key[0]), size_key(key[1]))


def figure4a(rows: list[RowData], confidence: float = 0.95) -> Figure:
    """Figure 4a: seconds per image vs FID, one curve per family (and per size when a family has several).

    With several seeds a point is their mean, with its t-interval as an error bar.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    curves = time_fid_curves(rows, confidence)
    sizes_of: dict[str, list[str]] = defaultdict(list)
    for family, size in sorted(curves, key=_family_sort):
        sizes_of[family].append(size)
    for family, size in sorted(curves, key=_family_sort):
        xs, ys, errs = zip(*curves[(family, size)], strict=True)
        marker = MARKERS[sizes_of[family].index(size) % len(MARKERS)]
        ax.errorbar(xs, ys, yerr=errs, marker=marker, capsize=3, color=FAMILY_COLORS[family], label=f"{family}-{size}")
    if curves:
        _plain_log_x(ax)
        ax.legend()
    else:
        _no_data(ax, "no time/FID points")
    ax.set_xlabel("inference time (s / image)")
    ax.set_ylabel("FID")
    ax.set_title("(a) inference time vs FID (ours)")
    ax.grid(True, alpha=0.3)
    return fig


_PAPER_MODEL = re.compile(r"^(MAR|De-MAR)-([BLH])$")


def _parse_params(text: str) -> float:
    value, unit = float(text[:-1]), text[-1]
    return value * {"K": 1e3, "M": 1e6, "B": 1e9}[unit]


def figure4b(rows: list[RowData], paper_table2: pd.DataFrame | None = None, confidence: float = 0.95) -> Figure:
    """Figure 4b: parameters vs FID, one curve per family over its sizes.

    Args:
        rows: every row's data; each (family, size) is one point (mean FID over seeds,
            with its t-interval as an error bar when there are several seeds).
        paper_table2: the paper's Table 2 as a DataFrame; when given, a second panel
            shows the paper's B/L/H points (FID with CFG), since the scales differ (default None).
        confidence: coverage of the error bars (default 0.95).
    """
    fig = _new_figure(2 if paper_table2 is not None else 1)
    axes = fig.subplots(1, 2 if paper_table2 is not None else 1, squeeze=False)[0]
    ax = axes[0]
    by_family: dict[str, list[tuple[float, float, float, str]]] = defaultdict(list)
    groups: dict[tuple[str, str], list[RowData]] = defaultdict(list)
    for row in rows:
        if row.family is not None:
            groups[(row.family, row.ref.size)].append(row)
    for (family, size), members in sorted(groups.items(), key=lambda kv: _family_sort(kv[0])):
        n_params = summarize(metric_values(members, "params_total")).mean
        s = summarize(metric_values(members, "fid"), confidence)
        if math.isfinite(n_params) and math.isfinite(s.mean):
            err = (s.ci_high - s.mean) if s.has_interval else 0.0
            by_family[family].append((n_params / 1e6, s.mean, err, size))
    for family, pts in by_family.items():
        pts.sort()
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=3,
            color=FAMILY_COLORS[family],
            label=family,
        )
        for x, y, _, size in pts:
            ax.annotate(size, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if by_family:
        _plain_log_x(ax)
        ax.legend()
    else:
        _no_data(ax, "no family rows")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("FID")
    ax.set_title("(b) parameters vs FID (ours)")
    ax.grid(True, alpha=0.3)

    if paper_table2 is not None:
        ax = axes[1]
        paper: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for rec in paper_table2.itertuples(index=False):
            m = _PAPER_MODEL.match(str(rec.model))
            if m and isinstance(rec.params, str) and math.isfinite(rec.fid_cfg):
                paper[m.group(1)].append((_parse_params(rec.params) / 1e6, float(rec.fid_cfg), m.group(2)))
        for family, pts in paper.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=FAMILY_COLORS[family], label=family)
            for x, y, size in pts:
                ax.annotate(size, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.legend()
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("FID (with CFG)")
        ax.set_title("paper, ImageNet 256x256 (Table 2)")
        ax.grid(True, alpha=0.3)
    return fig


def training_curves(curves: dict[str, list[tuple[int, float]]], metric: str) -> Figure:
    """Training ``metric`` against step, one line per row (from MLflow's metric history).

    Args:
        curves: row name -> (step, value) pairs.
        metric: the metric's name, for the axis label.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, pts in sorted(curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1)
    if curves:
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no training curves")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"training {metric}")
    ax.grid(True, alpha=0.3)
    return fig


def save_figure(
    fig: Figure, out_dir: str | os.PathLike[str], stem: str, formats: Sequence[str] = ("png", "svg"), dpi: int = 150
) -> dict[str, Path]:
    """Write ``fig`` as ``<out_dir>/<stem>.<fmt>`` for each format, atomically; return format -> path.

    Args:
        fig: the figure.
        out_dir: the output folder.
        stem: the file name without extension.
        formats: image formats (default PNG and SVG).
        dpi: resolution of raster formats (default 150).
    """
    paths = {}
    for fmt in formats:
        buf = io.BytesIO()
        # no creation date in SVG metadata, so unchanged figures give unchanged files
        metadata = {"Date": None} if fmt == "svg" else None
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
        path = Path(out_dir) / f"{stem}.{fmt}"
        atomic_write_bytes(path, buf.getvalue())
        paths[fmt] = path
    return paths


def _write_csv(path: Path, header: Sequence[str], records: Sequence[Sequence[object]]) -> Path:
    lines = [",".join(header)] + [",".join(repr(v) if isinstance(v, float) else str(v) for v in r) for r in records]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_plot_data(
    rows: list[RowData], curves: dict[str, list[tuple[int, float]]], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """The data behind the figures as CSV series for ``dvc plots``: one file, hence one plot, per row.

    Writes ``<out_dir>/train_curves/<row>.csv`` (``step,value``: the training curve
    metric) and ``<out_dir>/time_fid/<row>.csv`` (``sec_per_image,fid,ar_steps,diffusion_steps``,
    sorted by time; rows with time-vs-FID points only).

    Args:
        rows: every row's data.
        curves: row name -> (step, value) pairs, as :func:`training_curves` takes them.
        out_dir: the report folder.
    """
    out = Path(out_dir)
    paths = []
    for name, pts in sorted(curves.items()):
        paths.append(_write_csv(out / "train_curves" / f"{name}.csv", ("step", "value"), sorted(pts)))
    for row in rows:
        points = [
            (pt["sec_per_image"], pt["fid"], pt["ar_steps"], pt["diffusion_steps"])
            for pt in (row.time_fid or {}).get("points", [])
            if pt.get("sec_per_image") is not None and pt.get("fid") is not None
        ]
        if points:
            header = ("sec_per_image", "fid", "ar_steps", "diffusion_steps")
            paths.append(_write_csv(out / "time_fid" / f"{row.name}.csv", header, sorted(points)))
    return paths
