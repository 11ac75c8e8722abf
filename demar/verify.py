"""The reproduction check: after ``dvc repro``, compare every stage with a committed run.

Each stage's outputs are compared by the md5 that ``dvc.lock`` records (the
workspace's lock against the baseline commit's), and each metric of the stage's
metrics files against the baseline commit's file, within the tolerance that
:data:`TOLERANCES` states for it. A stage is

- ``identical``: every output has the baseline's md5;
- ``within tolerance``: some output differs, but every compared metric of the stage
  (or, for a stage without metrics, of the stages next to it that judge its
  outputs) is within its tolerance;
- ``differs``: a metric is outside its tolerance, or an output differs and no
  metric judges it;
- ``stale``: the workspace does not match ``dvc.lock`` (run ``dvc repro`` first);
- ``not in baseline`` / ``not run``: the stage exists on one side only.

Why a stage can differ without anything being wrong (wall-clock times in its files,
thread count, CPU kernels) is written per stage in :data:`NOTES` and in
docs/reproducibility.md.
"""

from __future__ import annotations

import fnmatch
import json
import math
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "NOTES",
    "TOLERANCES",
    "MetricCheck",
    "StageCheck",
    "Tolerance",
    "format_report",
    "tolerance_for",
    "verify",
]


@dataclass(frozen=True)
class Tolerance:
    """``|a - b| <= abs + rel * |b|``; ``None`` in :data:`TOLERANCES` means "not compared"."""

    rel: float = 0.0
    abs: float = 0.0

    def accepts(self, actual: float, expected: float) -> bool:
        if math.isnan(actual) or math.isnan(expected):
            return math.isnan(actual) and math.isnan(expected)
        return abs(actual - expected) <= self.abs + self.rel * abs(expected)

    def __str__(self) -> str:
        parts = [f"rel {self.rel:g}"] if self.rel else []
        parts += [f"abs {self.abs:g}"] if self.abs else []
        return " + ".join(parts) or "exact"


EXACT = Tolerance()

TOLERANCES: tuple[tuple[str, Tolerance | None], ...] = (
    # Measurements of the machine, not of the result: never compared.
    ("*wall_s", None),
    ("*train_s", None),
    ("*_per_s", None),
    ("*sec_per_image*", None),
    ("*seconds*", None),
    ("threads", None),
    ("resumed_from", None),
    ("reused_shards", None),
    # Results: as close as a rerun under another thread count or CPU lands.
    ("*fid*", Tolerance(rel=0.05, abs=0.01)),
    ("*kid*", Tolerance(rel=0.10, abs=1e-3)),
    ("is", Tolerance(rel=0.05)),
    ("is_*", Tolerance(rel=0.05, abs=1e-3)),
    ("*precision*", Tolerance(abs=0.02)),
    ("*recall*", Tolerance(abs=0.02)),
    ("*accuracy*", Tolerance(abs=0.02)),
    ("*psnr*", Tolerance(abs=0.1)),
    ("*loss*", Tolerance(rel=0.02)),
    ("*final_recon", Tolerance(rel=0.02)),
    ("*final_kl", Tolerance(rel=0.02)),
    ("*grad_norm*", Tolerance(rel=0.05)),
    ("scale", Tolerance(rel=0.01)),
    ("*", EXACT),  # counts, shapes, names: exactly
)
"""Per metric (``fnmatch`` pattern on the dotted key, first match wins): the tolerance, or None."""

_THREADS = "under another CPU thread count or CPU the numbers move by float rounding (docs/reproducibility.md)"
NOTES: dict[str, str] = {
    "check_params": "a record of the params check, not a result",
    "prepare_data": "the data are bitwise the same under any thread count; metrics/data.json holds wall_s",
    "train_tokenizer": f"bitwise the same under the same thread count; {_THREADS}; its metrics hold wall_s",
    "extract_latents": "bitwise the same as the tokenizer is; its metrics hold wall_s and images_per_s",
    "train_classifier": f"bitwise the same under the same thread count; {_THREADS}; its metrics hold wall_s",
    "train": (
        f"model.pt is bitwise the same under the same thread count; {_THREADS}; checkpoints/last.pt "
        "and metrics.jsonl hold wall-clock times and throughput, so models/<row> never keeps its md5"
    ),
    "sample": (
        f"the images are bitwise the same under the same thread count; {_THREADS}; manifest.json "
        "and timing.json hold seconds, so the folders never keep their md5"
    ),
    "evaluate": f"the same numbers under the same thread count; {_THREADS}; the file holds sec_per_image",
    "time_fid": "the FID points follow the model; every point holds its seconds per image, never compared",
    "report": "tables and figures hold the timings and MLflow run ids; judged by the metrics it reads",
}
"""Why each stage (its name before ``@``) may miss the baseline's md5."""


def tolerance_for(key: str) -> Tolerance | None:
    """The tolerance of metric ``key`` (dotted), or None when it is not compared."""
    last = key.rsplit(".", 1)[-1]
    for pattern, tol in TOLERANCES:
        if fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(last, pattern):
            return tol
    return EXACT


@dataclass
class MetricCheck:
    """One metric against the baseline: ``status`` is ``identical``, ``within``, ``differs``,
    ``not compared``, ``missing`` (gone from the workspace) or ``new`` (not in the baseline)."""

    file: str
    key: str
    actual: Any
    expected: Any
    tolerance: Tolerance | None
    status: str


@dataclass
class StageCheck:
    """One stage's verdict, the outputs whose md5 differs, its metrics and the stage's note."""

    stage: str
    verdict: str
    changed_outputs: list[str] = field(default_factory=list)
    metrics: list[MetricCheck] = field(default_factory=list)
    judged_by: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def failed_metrics(self) -> list[MetricCheck]:
        return [m for m in self.metrics if m.status in ("differs", "missing")]


def _git_show(root: Path, ref: str, path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _lock_outs(text: str | None) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` of a ``dvc.lock`` text."""
    if not text:
        return {}
    stages = yaml.safe_load(text).get("stages", {})
    return {name: {o["path"]: o.get("md5", "") for o in st.get("outs", [])} for name, st in stages.items()}


def _lock_deps(text: str | None) -> dict[str, set[str]]:
    if not text:
        return {}
    stages = yaml.safe_load(text).get("stages", {})
    return {name: {d["path"] for d in st.get("deps", [])} for name, st in stages.items()}


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, data


def _compare_metrics(file: str, actual: Any, expected: Any) -> list[MetricCheck]:
    got, want = dict(_leaves(actual)), dict(_leaves(expected))
    checks = []
    for key in sorted(got.keys() | want.keys()):
        tol = tolerance_for(key)
        a, e = got.get(key), want.get(key)
        if key not in got:
            status = "missing" if tol is not None else "not compared"
        elif key not in want:
            status = "new"
        elif tol is None:
            status = "not compared"
        elif a == e:
            status = "identical"
        elif isinstance(a, (int, float)) and isinstance(e, (int, float)) and not isinstance(a, bool):
            status = "within" if tol.accepts(float(a), float(e)) else "differs"
        else:
            status = "differs"
        checks.append(MetricCheck(file, key, a, e, tol, status))
    return checks


def _pipeline(root: Path) -> tuple[dict[str, list[str]], set[str]]:
    """``({stage: [metrics files]}, stale stages)``: the stages dvc.yaml declares (``foreach``
    resolved) with their metrics files, and those whose workspace does not match ``dvc.lock``."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        metrics = {s.name: [o.def_path for o in s.outs if o.metric] for s in repo.index.stages}
        status = repo.status()
    # a stage marked always_changed is listed every time; only real changes make it stale
    stale = {name.split(":")[-1] for name, changes in status.items() if changes != ["always changed"]}
    return metrics, stale


def _overlap(a: set[str], b: set[str]) -> bool:
    """Whether a path of ``a`` is, holds or lies in a path of ``b`` (outputs and deps may be folders)."""
    return any(x == y or x.startswith(y + "/") or y.startswith(x + "/") for x in a for y in b)


def _note(stage: str) -> str:
    return NOTES.get(stage.split("@")[0], "")


def _own_verdict(check: StageCheck) -> str | None:
    """The verdict of a stage's own metrics, or None when it has none."""
    if not check.metrics:
        return None
    return "differs" if check.failed_metrics else "within tolerance"


def verify(root: str | Path = ".", baseline: str = "HEAD") -> list[StageCheck]:
    """Check every stage of the workspace at ``root`` against the commit ``baseline``, in dvc.yaml order.

    Args:
        root: the repository (after ``dvc repro``).
        baseline: the git revision whose ``dvc.lock`` and metrics files are the reference.
    """
    root = Path(root)
    base_text = _git_show(root, baseline, "dvc.lock")
    if base_text is None:
        raise FileNotFoundError(f"{baseline}:dvc.lock does not exist; commit a reproduced run to verify against")
    current_text = (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else None
    base, current = _lock_outs(base_text), _lock_outs(current_text)
    deps = _lock_deps(current_text) or _lock_deps(base_text)
    metric_files, stale = _pipeline(root)

    # 1. Outputs and metrics of each stage of dvc.yaml (a lock keeps entries of removed stages).
    checks: dict[str, StageCheck] = {}
    for stage, files in metric_files.items():
        check = checks[stage] = StageCheck(stage, "", note=_note(stage))
        if stage not in current or stage not in base or stage in stale:
            check.verdict = "not run" if stage not in current else "not in baseline" if stage not in base else "stale"
            continue
        outs = base[stage].keys() | current[stage].keys()
        check.changed_outputs = sorted(p for p in outs if base[stage].get(p) != current[stage].get(p))
        for file in files:
            old, path = _git_show(root, baseline, file), root / file
            new = json.loads(path.read_text()) if path.is_file() else {}
            check.metrics += _compare_metrics(file, new, json.loads(old) if old is not None else {})
        threads = {(m.actual, m.expected) for m in check.metrics if m.key == "threads" and m.actual != m.expected}
        if threads:
            ran, was = threads.pop()
            check.note = f"ran with {ran} CPU threads, the baseline with {was}; {check.note}"

    # 2. Verdicts: a stage's own metrics judge it; a stage without metrics is judged by the
    #    metrics of the stages that read its outputs (with none, of those whose outputs it reads).
    for check in checks.values():
        if check.verdict:
            continue
        if not check.changed_outputs:
            check.verdict = "identical"
            continue
        verdict = _own_verdict(check)
        if verdict is None:
            outs = set(base[check.stage]) | set(current[check.stage])
            judges = [s for s, d in deps.items() if s in checks and checks[s].metrics and _overlap(d, outs)]
            if not judges:
                mine = deps.get(check.stage, set())
                judges = [s for s, o in current.items() if s in checks and checks[s].metrics and _overlap(set(o), mine)]
            check.judged_by = sorted(judges)
            verdicts = [_own_verdict(checks[s]) for s in judges]
            verdict = "within tolerance" if verdicts and "differs" not in verdicts else "differs"
        check.verdict = verdict
    return list(checks.values())


def format_report(checks: list[StageCheck], verbose: bool = False) -> str:
    """One line per stage (verdict, changed outputs, failing metrics); ``verbose`` adds every metric."""
    width = max((len(c.stage) for c in checks), default=5)
    lines = []
    for c in checks:
        line = f"{c.stage:<{width}}  {c.verdict}"
        if c.changed_outputs and c.verdict != "identical":
            line += f"; md5 differs: {', '.join(c.changed_outputs)}"
        if c.judged_by:
            line += f"; judged by {', '.join(c.judged_by)}"
        if c.verdict == "within tolerance" and c.metrics and all(
            m.status in ("identical", "not compared", "new") for m in c.metrics
        ):
            line += "; every compared metric identical"
        lines.append(line)
        for m in c.metrics if verbose else c.failed_metrics:
            if verbose or m.status != "identical":
                lines.append(f"{'':<{width}}    {m.file}:{m.key} = {m.actual!r} (baseline {m.expected!r}, "
                             f"{m.tolerance if m.tolerance is not None else 'not compared'}): {m.status}")  # fmt: skip
        if c.note and c.verdict not in ("identical",):
            lines.append(f"{'':<{width}}    why: {c.note}")
    return "\n".join(lines)
