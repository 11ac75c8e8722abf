"""The Optuna studies on the report page: what each searched, its best settings, what it cost.

Reads the folders ``python -m demar.studies run|report NAME`` writes under
``reports/studies/<name>/`` (``best_trials.json``, ``trials.csv``, the plots). A study
ran on the files its ``inputs`` record (checkpoint, latents, tokenizer, with their
SHA-256); where the current file differs, the page says the study was made from other
weights and its numbers do not describe the current rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from demar.io import file_sha256, read_json
from reports.html import image_tag, table_html

__all__ = ["StudyResult", "best_trials_table", "load_study_results", "studies_html"]

PLOTS = ("pareto_front", "history", "intermediate_values", "importances")
"""The study plots shown on the page, in this order (each when present)."""


@dataclass(frozen=True)
class StudyResult:
    """One study's report folder.

    Args:
        name: the study's name.
        folder: its report folder.
        summary: ``best_trials.json``.
        stale: one line per input file whose current content differs from the one the
            trials used (empty when every recorded input matches).
    """

    name: str
    folder: Path
    summary: dict[str, Any]
    stale: list[str]

    @property
    def plots(self) -> list[Path]:
        """The plot files present (``pareto_front``, ``history*``, ``intermediate_values``, ``importances*``)."""
        rank = {stem: i for i, stem in enumerate(PLOTS)}
        found = [p for p in self.folder.glob("*.png") if p.stem.startswith(PLOTS)]
        return sorted(found, key=lambda p: (min(rank[s] for s in PLOTS if p.stem.startswith(s)), p.stem))


def _stale_inputs(summary: dict[str, Any], root: Path) -> list[str]:
    lines = []
    for key, record in summary.get("inputs", {}).items():
        path = root / record["path"]
        if not path.is_file():
            lines.append(f"{key} {record['path']} is not here; the study's numbers cannot be checked against it")
        elif file_sha256(path) != record.get("sha256"):
            lines.append(f"{key} {record['path']} has changed since the study ran: its numbers describe the older file")
    return lines


def load_study_results(studies_dir: str | Path, root: str | Path = ".") -> list[StudyResult]:
    """Every study report under ``studies_dir`` (one folder each, with ``best_trials.json``), by name.

    Args:
        studies_dir: the studies' report folder (``reports/studies``); absent means no study.
        root: the folder the recorded input paths are relative to (the repository).
    """
    results = []
    for summary_file in sorted(Path(studies_dir).glob("*/best_trials.json")):
        folder = summary_file.parent
        summary = read_json(summary_file)
        stale = _stale_inputs(summary, Path(root))
        results.append(StudyResult(summary.get("study", folder.name), folder, summary, stale))
    return results


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else ""
    return str(v)


def best_trials_table(result: StudyResult) -> pd.DataFrame:
    """The best trials (the Pareto front with several objectives): number, objective values, params."""
    records = []
    for t in result.summary.get("best", []):
        rec = {"trial": t["number"]}
        rec.update({name: _value(v) for name, v in t["values"].items()})
        rec.update({name: _value(v) for name, v in sorted(t["params"].items())})
        records.append(rec)
    return pd.DataFrame(records)


def _minutes(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds / 60:.1f} min"


def studies_html(results: list[StudyResult], max_px: int | None = None) -> str:
    """The page section: per study its counts, cost, best trials and plots."""
    if not results:
        return "<p>No study report under reports/studies/ (run <code>demar study run NAME</code>).</p>"
    parts = []
    for r in results:
        s = r.summary
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(s.get("counts", {}).items())) or "no trials"
        objectives = ", ".join(f"{k} ({v})" for k, v in s.get("objectives", {}).items())
        head = (
            f"<h3>{escape(r.name)}</h3><p>Row <b>{escape(str(s.get('row', '?')))}</b>; objectives {escape(objectives)}; "
            f"trials: {escape(counts)}; {escape(_minutes(s.get('wall_seconds')))} from the first trial's start to the "
            f"last one's end ({escape(_minutes(s.get('trial_seconds')))} of trials). "
            f"Command: <code>demar study run {escape(r.name)}</code>; stored as <code>{escape(str(s.get('stored_as', '?')))}"
            "</code>.</p>"
        )
        head += "".join(f'<p class="note">{escape(line)}</p>' for line in r.stale)
        best = best_trials_table(r)
        label = "Pareto front" if len(s.get("objectives", {})) > 1 else "Best trial"
        body = table_html(best, caption=label) if len(best) else "<p>No complete trial.</p>"
        figs = "".join(
            f"<figure>{image_tag(p, f'{r.name}: {p.stem}', max_px)}<figcaption>{escape(p.stem)}</figcaption></figure>"
            for p in r.plots
        )
        parts.append(head + body + figs)
    return "".join(parts)
