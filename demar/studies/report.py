"""A study's report: Optuna's plots, the trial table and the best trials, also logged to MLflow."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from demar.io import atomic_write_bytes, atomic_write_text, write_json
from demar.studies.base import resolve_base
from demar.studies.config import StudyConfig, load_study_config
from demar.studies.identity import file_digest, input_files, storage_name, study_identity
from demar.studies.storage import PARENT_RUN_ATTR, TRIAL_RUN_ATTR, default_storage, open_storage, redact
from demar.tracking import RunLogger, TrackingError, check_tracking

__all__ = ["REPORT_ROOT", "StudyReport", "report_study", "stored_study_name", "trial_times"]

REPORT_ROOT = Path("reports") / "studies"  # beside reports/out, which the report stage owns
"""Default parent folder of the study reports (``<REPORT_ROOT>/<name>/``)."""


PLOT_DPI = 120
"""Resolution of the study plots (PNG)."""


@dataclass
class StudyReport:
    """What :func:`report_study` found and wrote.

    Attributes:
        name: the study's name.
        counts: number of trials per Optuna state (``COMPLETE``, ``PRUNED``, ``FAIL``, ...).
        best: the best trials (the Pareto front with several objectives): ``number``,
            ``values`` (name -> value), ``params``, ``mlflow_run_id``.
        files: the files written to the report folder.
        parent_run_id: the study's MLflow parent run, or None.
    """

    name: str
    counts: dict[str, int]
    best: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    parent_run_id: str | None = None


def _save_figure(ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plots(study: optuna.Study, names: list[str], out: Path) -> list[Path]:
    """Optuna's matplotlib plots: history per objective, importances (>= 2 complete trials),
    the Pareto front (several objectives) and the intermediate values (pruned studies)."""
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    multi = len(names) > 1
    jobs: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
    for i, name in enumerate(names):
        suffix = f"_{name}" if multi else ""
        per_objective = {"target": (lambda t, i=i: t.values[i]) if multi else None, "target_name": name}
        jobs.append((f"history{suffix}", vis.plot_optimization_history, per_objective))
        if len(complete) >= 2:
            jobs.append((f"importances{suffix}", vis.plot_param_importances, per_objective))
    if multi and complete:
        jobs.append(("pareto_front", vis.plot_pareto_front, {"target_names": names}))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        jobs.append(("intermediate_values", vis.plot_intermediate_values, {}))
    files = []
    for stem, plot, kwargs in jobs:
        try:
            with warnings.catch_warnings():  # Optuna's notes on experimental plots and importances
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                files.append(_save_figure(plot(study, **kwargs), out / f"{stem}.png"))
        except Exception as err:  # noqa: BLE001 - one plot that cannot be drawn must not stop the report
            warnings.warn(f"study plot {stem!r} not drawn ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
    return files


def trial_times(trials: list[optuna.trial.FrozenTrial]) -> dict[str, float | None]:
    """``trial_seconds`` (the finished trials' durations summed) and ``wall_seconds`` (first
    start to last finish: with several workers, less than the sum)."""
    done = [t for t in trials if t.datetime_start is not None and t.datetime_complete is not None]
    if not done:
        return {"trial_seconds": None, "wall_seconds": None}
    total = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return {"trial_seconds": round(total, 1), "wall_seconds": round(span.total_seconds(), 1)}


def _inputs(cfg: StudyConfig) -> dict[str, dict[str, str | None]]:
    """The files the trials started from, with their SHA-256, so a reader can tell a report
    made from other weights or latents (``{}`` when params.yaml no longer resolves)."""
    try:
        base = resolve_base(cfg, check_files=False)
    except Exception:  # noqa: BLE001 - the report's other parts do not need the inputs
        return {}
    return {k: {"path": p.as_posix(), "sha256": file_digest(p)} for k, p in input_files(base).items() if p is not None}


def stored_study_name(cfg: StudyConfig, url: str) -> str:
    """The name under which ``cfg``'s study is stored: the one of the current code and config if the
    storage holds it, else the latest (said in one line).

    Raises:
        FileNotFoundError: the storage holds no such study.
    """
    local = Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None if "://" in url else Path(url)
    if local is not None and not local.is_file():  # do not leave an empty storage behind
        raise FileNotFoundError(f"no study {cfg.name!r} in {redact(url)}: run it first")
    names = [n for n in optuna.get_all_study_names(open_storage(url)) if n.startswith(f"{cfg.name}@")]
    if not names:
        raise FileNotFoundError(f"no study {cfg.name!r} in {redact(url)}: run it first")
    if len(names) == 1:
        return names[0]
    try:
        current = storage_name(cfg, study_identity(cfg, resolve_base(cfg, check_files=False)))
    except Exception:  # noqa: BLE001 - params or files gone: fall back to the latest study
        current = None
    if current in names:
        return current
    print(f"study {cfg.name}: none of {', '.join(names)} matches the current code and config; reporting the latest")
    return names[-1]


def report_study(
    config: str | os.PathLike[str],
    *,
    storage: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    study_name: str | None = None,
) -> StudyReport:
    """Write a study's plots, trial table and best trials, and log them to its MLflow parent run.

    Writes ``trials.csv``, ``best_trials.json`` and the PNG plots to ``out_dir`` and
    copies them into the parent run's artifacts under ``study/``; sets the parent's
    metrics ``trials_<state>`` and ``best_<objective>`` (one objective) or
    ``pareto_size`` (several), and tags ``demar.best.<param>`` (one objective).

    Args:
        config: the study file.
        storage: the storage URL or journal path (default: ``<name>.db`` beside the file).
        out_dir: the report folder (default ``reports/studies/<name>``).
        study_name: the study's name in the storage (default :func:`stored_study_name`).
    """
    cfg = load_study_config(config)
    url = storage or default_storage(config, cfg.name)
    study = optuna.load_study(study_name=study_name or stored_study_name(cfg, url), storage=open_storage(url))
    names = list(cfg.objectives)
    out = Path(out_dir or REPORT_ROOT / cfg.name)
    out.mkdir(parents=True, exist_ok=True)

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best_trials = (study.best_trials if len(names) > 1 else [study.best_trial]) if complete else []
    best = [
        {
            "number": t.number,
            "values": dict(zip(names, t.values, strict=True)),
            "params": t.params,
            "mlflow_run_id": t.user_attrs.get(TRIAL_RUN_ATTR),
        }
        for t in sorted(best_trials, key=lambda t: t.number)
    ]
    files = [out / "best_trials.json", out / "trials.csv"]
    summary = {
        "study": cfg.name,
        "stored_as": study.study_name,
        "objectives": cfg.objectives,
        "row": cfg.base.row,
        "counts": counts,
        **trial_times(trials),
        "inputs": _inputs(cfg),
        "best": best,
    }
    write_json(files[0], summary)
    atomic_write_text(files[1], study.trials_dataframe().to_csv(index=False) if trials else "")
    files += _plots(study, names, out)

    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent is not None:
        try:
            uri = check_tracking()
        except TrackingError as err:  # the report's files are written; MLflow is a copy
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)
            return StudyReport(cfg.name, counts, best, files, parent)
        log = RunLogger(parent, uri=uri)
        step = len(trials)
        metrics = {f"trials_{state.lower()}": n for state, n in counts.items()}
        if len(names) == 1 and best:
            metrics[f"best_{names[0]}"] = best[0]["values"][names[0]]
            tags = {f"demar.best.{k}": v for k, v in best[0]["params"].items()}
            log.set_tags({**tags, "demar.best.trial": best[0]["number"]})
        elif best:
            metrics["pareto_size"] = len(best)
        log.log_metrics(metrics, step=step)
        for f in files:
            log.log_artifact(f, "study")
        log.close()
    return StudyReport(cfg.name, counts, best, files, parent)


