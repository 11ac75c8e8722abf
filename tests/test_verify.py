"""The reproduction check on a two-stage DVC project made in a temporary folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from demar.verify import EXACT, Tolerance, format_report, tolerance_for, verify

DVC = str(Path(sys.executable).parent / "dvc")

# `make` writes a model file and a metrics file from the value in value.txt (plus a
# wall-clock time); `score` reads the model and writes nothing else.
DVC_YAML = """
stages:
  make:
    cmd: python make.py
    deps: [make.py, value.txt]
    outs: [model.txt]
    metrics:
      - metrics/make.json:
          cache: false
  score:
    cmd: python -c "open('score.txt', 'w').write(open('model.txt').read() * 2)"
    deps: [model.txt]
    outs: [score.txt]
"""

MAKE = """
import json, os, time
value = float(open("value.txt").read())
open("model.txt", "w").write(repr(value))
os.makedirs("metrics", exist_ok=True)
json.dump({"fid": value, "steps": 3, "wall_s": time.perf_counter()}, open("metrics/make.json", "w"))
"""


def run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def commit(repo: Path) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], repo)


@pytest.fixture
def project(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run([DVC, "init", "-q"], repo)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "make.py").write_text(MAKE)
    (repo / "value.txt").write_text("10.0")
    run([DVC, "repro", "-q"], repo)
    commit(repo)
    return repo


def verdicts(repo: Path) -> dict[str, str]:
    return {c.stage: c.verdict for c in verify(repo)}


def test_tolerances_by_metric_name():
    assert tolerance_for("wall_s") is None and tolerance_for("points[1].sec_per_image") is None
    assert tolerance_for("points[0].fid") == Tolerance(rel=0.05, abs=0.01)
    assert tolerance_for("psnr").accepts(33.42, 33.36) and not tolerance_for("psnr").accepts(33.6, 33.36)
    assert tolerance_for("num_images") is EXACT and not EXACT.accepts(41.0, 40.0)


def test_a_rerun_is_identical_or_within_tolerance_and_a_moved_result_differs(project):
    assert verdicts(project) == {"make": "identical", "score": "identical"}

    # Rerun: the model is bitwise the same, the metrics file only differs in its timing.
    run([DVC, "repro", "-q", "-f", "make"], project)
    checks = {c.stage: c for c in verify(project)}
    assert checks["make"].verdict == "within tolerance", format_report(list(checks.values()))
    assert checks["make"].changed_outputs == ["metrics/make.json"]
    assert checks["score"].verdict == "identical"

    # A small move of the result: within FID's 5%; the score stage is judged by make's metrics.
    (project / "value.txt").write_text("10.2")
    run([DVC, "repro", "-q"], project)
    checks = {c.stage: c for c in verify(project)}
    assert checks["make"].verdict == "within tolerance"
    assert checks["score"].verdict == "within tolerance" and checks["score"].judged_by == ["make"]

    # A large one: both differ, and the report names the metric.
    (project / "value.txt").write_text("12.0")
    run([DVC, "repro", "-q"], project)
    checks = verify(project)
    assert {c.stage: c.verdict for c in checks} == {"make": "differs", "score": "differs"}
    assert "metrics/make.json:fid = 12.0 (baseline 10.0" in format_report(checks)

    # Not reproduced yet: the workspace does not match dvc.lock.
    (project / "value.txt").write_text("10.0")
    assert verdicts(project)["make"] == "stale"
