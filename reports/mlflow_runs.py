"""The cross-stage comparison from MLflow: the latest run of every (stage, row), side by side.

Runs are those of the preset's experiment (``demar-<preset>``) that carry the
``demar.repro_id`` tag. For each (stage, row) the most recent run is kept; a stage
that the latest reproduction did not re-run (DVC found it up to date) keeps its
run from an earlier reproduction, and the ``latest_repro`` column tells them apart.
The report's own runs are left out. An unreachable or empty store is not an error:
the comparison then carries no table and a note saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from demar.tracking import TAG_PREFIX, TrackingError, check_tracking, experiment_name, tracking_uri

__all__ = ["MlflowComparison", "compare_runs"]

REPORT_WORK = "report"


@dataclass(frozen=True)
class MlflowComparison:
    """What MLflow holds about the latest reproduction.

    Args:
        uri: the tracking URI that was read.
        table: one line per (stage, row), or None when there is nothing to show.
        note: one sentence about the source (or why the table is absent).
        latest_repro_id: the ``demar.repro_id`` of the most recent run, or None.
        curves: row -> (step, value) history of the training curve metric, per train run shown.
    """

    uri: str
    table: pd.DataFrame | None
    note: str
    latest_repro_id: str | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _tag(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"tags.{TAG_PREFIX}{name}"
    return df[col] if col in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def compare_runs(
    uri: str | None, preset: str, metrics: list[str], curve_metric: str | None = "loss"
) -> MlflowComparison:
    """Read the preset's experiment and build the comparison table.

    Args:
        uri: the tracking URI; None means :func:`demar.tracking.tracking_uri`.
        preset: the params preset (experiment ``demar-<preset>``).
        metrics: metric names to show as columns, those present in at least one run.
        curve_metric: the metric whose history is read from each train run shown,
            None to read none (default ``"loss"``).
    """
    import mlflow

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return MlflowComparison(uri, None, f"no MLflow store at {uri} (no stage has logged a run yet)")
    try:
        check_tracking(uri)
    except TrackingError as err:
        return MlflowComparison(uri, None, f"MLflow unreachable, comparison left out: {err}")
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name(preset))
    if exp is None:
        return MlflowComparison(uri, None, f"MLflow store {uri} has no experiment {experiment_name(preset)!r}")
    df = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")
    if len(df):
        df = df[_tag(df, "repro_id").notna() & (_tag(df, "work") != REPORT_WORK)]
    if not len(df):
        return MlflowComparison(uri, None, f"MLflow experiment {exp.name!r} has no stage runs yet")

    df = df.sort_values("start_time", ascending=False)
    latest = str(_tag(df, "repro_id").iloc[0])
    work = _tag(df, "work").fillna(_tag(df, "stage")).fillna("")
    df = df.assign(_work=work, _row=_tag(df, "row").fillna("")).drop_duplicates(subset=["_work", "_row"])
    df = df.sort_values(["_row", "start_time"])  # each row's stages in the order they ran
    table = pd.DataFrame(
        {
            "row": df["_row"],
            "stage": _tag(df, "stage").fillna(df["_work"]),
            "seed": _tag(df, "seed").fillna(""),
            "status": df["status"],
            "start_time": df["start_time"].dt.strftime("%Y-%m-%d %H:%M:%S"),
            "repro_id": _tag(df, "repro_id"),
            "latest_repro": _tag(df, "repro_id") == latest,
            "git_commit": _tag(df, "git_commit").fillna("").str[:10],
            "run_id": df["run_id"],
        }
    )
    for name in metrics:
        if f"metrics.{name}" in df:
            table[name] = df[f"metrics.{name}"]
    table = table.reset_index(drop=True)

    curves: dict[str, list[tuple[int, float]]] = {}
    if curve_metric:
        for run_id, work_name, row in zip(df["run_id"], df["_work"], df["_row"], strict=True):
            if work_name != "train":
                continue
            history = client.get_metric_history(run_id, curve_metric)
            pts = [(m.step, m.value) for m in history if math.isfinite(m.value)]
            if len(pts) >= 2:
                curves[row or run_id[:8]] = pts
    n_latest = int(table["latest_repro"].sum())
    note = (
        f"MLflow {uri}, experiment {exp.name!r}: latest run of each (stage, row); "
        f"{n_latest} of {len(table)} from the latest reproduction {latest}."
    )
    return MlflowComparison(uri, table, note, latest, curves)
