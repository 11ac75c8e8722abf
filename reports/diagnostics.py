"""The diagnostics section of the report: what the denoising head does on our rows.

Reads ``metrics/diagnostics/<row>.json`` (the ``diagnose@<row>`` stage) and builds a
table (refinement on against off, the masked-token loss by kind of visible tokens, the
head's gain and calibration) and three figures: the errors of x~, y and the fused token
by injection level, the reliability of the assessment scores, and the masked-token loss.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from demar.io import read_json
from reports.data import RowData
from reports.figures import _new_figure, _no_data
from reports.tables import Table

__all__ = ["diagnostics_table", "figure_calibration", "figure_levels", "figure_masked_loss", "load_diagnostics"]

LOSS_KINDS = {"ground_truth": "ground truth", "noisy": "noisy ground truth", "own_samples": "own samples"}


def load_diagnostics(metrics_dir: str | os.PathLike[str], rows: list[RowData]) -> dict[str, dict[str, Any]]:
    """``metrics/diagnostics/<row>.json`` of every row that has one, by row name (params order)."""
    found = {}
    for row in rows:
        path = Path(metrics_dir) / "diagnostics" / f"{row.name}.json"
        if path.is_file():
            found[row.name] = read_json(path)
    return found


def _fmt(value: Any, digits: int = 3) -> str:
    """A cell: blank where a row has no such value (None, or NaN once in a DataFrame)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def diagnostics_table(records: dict[str, dict[str, Any]], rows: list[RowData]) -> Table:
    """One line per row: FID and class accuracy with refinement on (evaluate) and off, the masked-token
    loss by kind of visible tokens, the fused token's gain at the largest trained level, and calibration."""
    by_name = {r.name: r for r in rows}
    lines = []
    for name, rec in records.items():
        ev = by_name[name].evaluate
        off = rec.get("refine_off") or {}
        loss = rec["masked_loss"]
        levels = rec.get("levels") or []
        gains = {lv["level"]: lv["gain"] for lv in levels}
        cal = rec.get("calibration") or {}
        lines.append(
            {
                "Row": name,
                "Ablation": rec["ablation"],
                "Size": rec["size"],
                "Seed": rec["seed"],
                "FID (refine on)": ev.get("fid"),
                "FID (refine off)": off.get("fid"),
                "Class acc. (on)": ev.get("class_accuracy"),
                "Class acc. (off)": off.get("class_accuracy"),
                **{f"Loss, {label}": loss[k] for k, label in LOSS_KINDS.items()},
                "Gain at s=100": gains.get(100),
                "Score corr.": cal.get("pearson"),
            }
        )
    values = pd.DataFrame(lines)
    display = values.map(_fmt) if len(values) else values
    caption = (
        "Diagnostics (diagnose@<row>, on held-out reference images). FID and class accuracy with the "
        "denoising head's refinement at inference on (the evaluate stage) and off (same weights); the "
        "backbone's diffusion loss on masked tokens when the visible tokens are the ground truth, the "
        "ground truth with injected noise, or half re-drawn by the model; the gain: squared error of x~ "
        "minus that of the fused token at injection step 100 (positive: the head denoises); score corr.: "
        "Pearson correlation of the assessment scores with the true cosine similarities."
    )
    return Table(stem="diagnostics", caption=caption, numeric=values, display=display)


def figure_levels(records: dict[str, dict[str, Any]]) -> Figure:
    """Squared error to the clean token of x~, y and the fused token against the injection step, per De. Head row."""
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = False
    for k, (name, rec) in enumerate(r for r in records.items() if r[1].get("levels")):
        levels = rec["levels"]
        s = [lv["level"] for lv in levels]
        color = f"C{k}"
        ax.plot(s, [lv["input"] for lv in levels], color=color, linestyle=":", marker=".", label=f"{name}: x~ (input)")
        ax.plot(s, [lv["refined"] for lv in levels], color=color, linestyle="--", marker=".", label=f"{name}: y")
        ax.plot(s, [lv["fused"] for lv in levels], color=color, linestyle="-", marker="o", label=f"{name}: fused")
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "no De. Head rows")
    ax.set_xlabel("injected noise step s")
    ax.set_ylabel("squared error to the clean token")
    ax.set_title("where the denoising head denoises")
    ax.grid(True, alpha=0.3)
    return fig


def figure_calibration(records: dict[str, dict[str, Any]]) -> Figure:
    """Reliability plot of the assessment scores: mean true cosine similarity per bin of predicted score."""
    fig = _new_figure()
    ax = fig.add_subplot()
    cals = [(name, rec["calibration"]) for name, rec in records.items() if rec.get("calibration")]
    lo, hi = 1.0, 0.0
    for k, (name, cal) in enumerate(cals):
        pred = [b["predicted"] for b in cal["bins"]]
        true = [b["true"] for b in cal["bins"]]
        ax.plot(pred, true, marker="o", color=f"C{k}", label=f"{name} (r = {cal['pearson']:.2f})")
        lo, hi = min(lo, *pred, *true), max(hi, *pred, *true)
    if cals:
        ax.plot([lo, hi], [lo, hi], color="0.5", linestyle=":", label="calibrated")
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "no De. Head rows")
    ax.set_xlabel("predicted score")
    ax.set_ylabel("true cosine similarity")
    ax.set_title("assessment calibration")
    ax.grid(True, alpha=0.3)
    return fig


def figure_masked_loss(records: dict[str, dict[str, Any]]) -> Figure:
    """The masked-token diffusion loss per row for each kind of visible tokens (grouped bars)."""
    fig = _new_figure(ncols=max(1, min(len(records), 8)) // 4 + 1)
    ax = fig.add_subplot()
    names = list(records)
    width = 0.8 / len(LOSS_KINDS)
    for j, (key, label) in enumerate(LOSS_KINDS.items()):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, [records[n]["masked_loss"][key] for n in names], width=width, label=label, color=f"C{j}")
    if names:
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.legend(fontsize=7, title="visible tokens", title_fontsize=7)
        values = [records[n]["masked_loss"][k] for n in names for k in LOSS_KINDS]
        span = max(values) - min(values)
        ax.set_ylim(max(0.0, min(values) - span), max(values) + span / 2)
    else:
        _no_data(ax, "no diagnostics")
    ax.set_ylabel("diffusion loss on masked tokens")
    ax.set_title("train/inference discrepancy")
    ax.grid(True, axis="y", alpha=0.3)
    return fig
