"""``demar repro --jobs N``: independent stages run at once, the outcome is that of ``dvc repro``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from demar.repro import pipeline_graph, run_parallel

# A diamond: a -> (b, c) -> d. b and c each record when they started and ended.
STAGE = (
    "{py} -c \"import time,sys; s=time.time(); time.sleep({sleep}); "
    "open('{name}.txt','w').write(open('a.txt').read() + '{name}' + chr(10) + repr((s, time.time())))\""
)


def _project(root: Path, fail: str | None = None) -> None:
    py = sys.executable
    stages = {
        "a": {"cmd": f"{py} -c \"open('a.txt','w').write('a')\"", "outs": ["a.txt"]},
        **{
            name: {
                "cmd": STAGE.format(py=py, sleep=2.0, name=name) + (" && exit 3" if name == fail else ""),
                "deps": ["a.txt"],
                "outs": [f"{name}.txt"],
            }
            for name in ("b", "c")
        },
        "d": {"cmd": f"{py} -c \"open('d.txt','w').write('d')\"", "deps": ["b.txt", "c.txt"], "outs": ["d.txt"]},
    }
    root.mkdir(exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


def _status(root: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def _span(path: Path) -> tuple[float, float]:
    return ast.literal_eval(path.read_text().splitlines()[-1])  # the (start, end) the stage wrote


@pytest.mark.slow
def test_independent_stages_run_at_once_and_dvc_lock_records_every_stage(tmp_path):
    _project(tmp_path)
    lines: list[str] = []
    results = run_parallel(pipeline_graph(tmp_path), jobs=2, root=tmp_path, echo=lines.append)

    assert [r.status for r in results] == ["ran"] * 4, lines
    order = [r.stage for r in results]
    assert order[0] == "a" and order[-1] == "d" and set(order[1:3]) == {"b", "c"}
    (b0, b1), (c0, c1) = _span(tmp_path / "b.txt"), _span(tmp_path / "c.txt")
    assert max(b0, c0) < min(b1, c1), "b and c overlapped in time"
    assert _status(tmp_path) == {}, "dvc.lock records every stage, as after dvc repro"
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c", "d"}
    assert (tmp_path / ".dvc" / "tmp" / "repro" / "b.log").read_text().startswith("Running stage 'b'")

    again = run_parallel(pipeline_graph(tmp_path), jobs=2, root=tmp_path, echo=lines.append)
    assert all(r.status == "ran" for r in again)
    assert all("didn't change" in r.log.read_text() for r in again), "unchanged stages are skipped by DVC"


@pytest.mark.slow
def test_a_failed_stage_stops_its_downstream_and_the_run_fails(tmp_path):
    _project(tmp_path, fail="c")
    lines: list[str] = []
    results = {r.stage: r.status for r in run_parallel(pipeline_graph(tmp_path), jobs=2, root=tmp_path, echo=lines.append)}

    assert results == {"a": "ran", "b": "ran", "c": "failed", "d": "skipped"}, lines
    text = "\n".join(lines)
    assert "FAILED c (exit" in text and "exited with 3" in text, "the failure's log tail is shown"
    assert not (tmp_path / "d.txt").exists()
    assert set(_status(tmp_path)) == {"c", "d"}, "the stages that ran are recorded; the rest stay changed"


def test_graph_targets_take_their_upstream_and_foreach_groups(tmp_path):
    _project(tmp_path)
    assert pipeline_graph(tmp_path) == {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    assert pipeline_graph(tmp_path, ["b"]) == {"a": [], "b": ["a"]}
    with pytest.raises(ValueError, match="no stage 'e' in dvc.yaml"):
        pipeline_graph(tmp_path, ["e"])

    group = tmp_path / "group"
    group.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=group, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=group, check=True)
    (group / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"train": {"foreach": ["x", "y"], "do": {"cmd": "echo ${item}"}}, "other": {"cmd": "echo"}}})
    )
    assert set(pipeline_graph(group, ["train"])) == {"train@x", "train@y"}


def test_jobs_below_one_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        run_parallel({"a": []}, jobs=0, root=tmp_path)


@pytest.mark.slow
def test_a_stage_that_ends_while_another_process_holds_the_lock_is_still_recorded(tmp_path):
    import threading

    import zc.lockfile

    py = sys.executable
    count = "open('runs.txt','a').write('x')"
    stages = {"b": {"cmd": f"{py} -c \"import time; {count}; time.sleep(2); open('b.txt','w').write('b')\"",
                    "outs": ["b.txt"]}}  # fmt: skip
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))

    def hold_lock() -> None:  # another DVC process, for longer than DVC's own 3 s of retries
        time.sleep(1.0)
        lock = zc.lockfile.LockFile(str(tmp_path / ".dvc" / "tmp" / "lock"))
        time.sleep(8.0)
        lock.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    lines: list[str] = []
    results = run_parallel(pipeline_graph(tmp_path), jobs=1, root=tmp_path, echo=lines.append)
    holder.join()
    assert [r.status for r in results] == ["ran"], lines
    assert (tmp_path / "runs.txt").read_text() == "x", "the stage ran once"
    assert _status(tmp_path) == {}, "and its run is recorded in dvc.lock"


# Two stages that are the first to use the MLflow store, started together: each opens it and
# writes whether the store's file existed when it started.
OPEN_STORE = (
    "{py} -c \"import os; seen = os.path.exists(r'{db}'); import mlflow; "
    "mlflow.MlflowClient(tracking_uri=r'sqlite:///{db}').search_experiments(); open('{name}.txt','w').write(str(seen))\""
)


def _store_project(root: Path, db: Path) -> None:
    py = sys.executable
    stages = {name: {"cmd": OPEN_STORE.format(py=py, db=db, name=name), "outs": [f"{name}.txt"]} for name in "bc"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": True}}))


@pytest.mark.slow
@pytest.mark.reliability
def test_stages_side_by_side_find_the_tracking_store_created(tmp_path, monkeypatch):
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    (tmp_path / "p").mkdir()
    _store_project(tmp_path / "p", db)
    lines: list[str] = []
    results = run_parallel(pipeline_graph(tmp_path / "p"), jobs=2, root=tmp_path / "p", echo=lines.append)
    assert [r.status for r in results] == ["ran", "ran"], lines
    assert {(tmp_path / "p" / f"{n}.txt").read_text() for n in "bc"} == {"True"}, "both found the store made"


def test_tracking_store_is_created_once_and_only_when_tracked(tmp_path, monkeypatch):
    from demar.repro import create_tracking_store

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    assert create_tracking_store(tmp_path) is None and not db.exists()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": True}}))
    assert create_tracking_store(tmp_path) == db and db.is_file()
    assert create_tracking_store(tmp_path) is None, "an existing store is left as it is"
    other = tmp_path / "other"
    other.mkdir()
    (other / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": True}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert create_tracking_store(other) is None, "a server is not created"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert create_tracking_store(other) == (other / "mlflow.db").resolve(), "default: mlflow.db at the root"
