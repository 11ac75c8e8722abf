"""MLflow tracking (demar.tracking): stage runs, background logging, offline spool and sync,
stale runs of killed processes, unusable stores.

The tests with a server start a real ``mlflow server`` on 127.0.0.1 and kill it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest
import requests

from demar.cli import main as cli_main
from demar.tracking import RunLogger, TrackingError, flatten, stage_run
from demar.tracking_sync import sync_unsynced

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def spool(tmp_path, monkeypatch):
    """A private spool of unsent calls for one test."""
    folder = tmp_path / "unsynced"
    monkeypatch.setenv("DEMAR_UNSYNCED_DIR", str(folder))
    return folder


def test_stage_run_records_params_metrics_and_tags(mlflow_uri, monkeypatch):
    monkeypatch.setenv("DEMAR_REPRO_ID", "abc123")
    with stage_run("train", row="demar", seed=3, params={"train": {"lr": 0.1, "betas": [0.9, 0.95]}}) as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    df = mlflow.search_runs(experiment_names=["demar-embedded"])
    assert len(df) == 1
    row = df.iloc[0]
    assert row["params.train.lr"] == "0.1"
    assert row["params.train.betas"] == "[0.9, 0.95]"
    assert row["tags.demar.row"] == "demar"
    assert row["tags.demar.seed"] == "3"
    assert row["tags.demar.repro_id"] == "abc123"
    assert row["tags.demar.stage"] == "train"
    assert row["tags.demar.pid"] == str(os.getpid())
    assert row["status"] == "FINISHED"
    assert row["metrics.loss"] == pytest.approx(0.2)
    history = mlflow.MlflowClient().get_metric_history(row["run_id"], "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]


def test_images_and_dicts_are_logged_from_memory(mlflow_uri):
    import numpy as np

    with stage_run("train") as run:
        run.log_image(np.zeros((4, 4, 3), dtype=np.uint8), "samples", step=7)
        run.log_dict({"a": 1}, "summary/result.json")
    run_id = mlflow.search_runs(experiment_names=["demar-embedded"]).iloc[0]["run_id"]
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run_id, "images")] == ["images/samples_00000007.png"]
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/summary/result.json") == {"a": 1}


def test_failed_work_marks_run_failed(mlflow_uri):
    with pytest.raises(RuntimeError):
        with stage_run("evaluate") as run:
            run.log_metrics({"fid": 1.0})
            raise RuntimeError("boom")
    df = mlflow.search_runs(experiment_names=["demar-embedded"])
    assert df.iloc[0]["status"] == "FAILED"


def test_unreachable_server_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="unreachable"):
        with stage_run("train"):
            pass


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}}) == {"a.b": 1, "a.c.d": "[1, 2]"}


# ----------------------------------------------------------------------------- reliability


@pytest.mark.reliability
def test_read_only_store_is_a_tracking_error_naming_the_file(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("train"):
        pass  # creates the store's tables
    db.chmod(0o444)
    immutable = os.geteuid() == 0  # root ignores file modes: make the file immutable instead
    if immutable:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(db)]).returncode != 0:
            pytest.skip("running as root without chattr: a file cannot be made read-only")
    try:
        with pytest.raises(TrackingError, match=rf"{db}.*read-only"):
            with stage_run("train"):
                pytest.fail("the work must not start")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(db)], check=True)
        db.chmod(0o644)


@pytest.mark.reliability
def test_a_store_lost_mid_run_warns_once_spools_and_syncs_later(mlflow_uri, spool):
    with stage_run("train", row="demar") as run:
        run_id = run.run_id
        run.log_metrics({"loss": 1.0}, step=0)
    client = mlflow.MlflowClient(mlflow_uri)
    client.update_run(run_id, "RUNNING")  # reopen it; now log to it through a dead server
    logger = RunLogger(run_id, flush_every=1, uri="http://127.0.0.1:9", meta={"stage": "train", "row": "demar"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        for step in range(1, 30):
            logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)  # never blocks
        logger.set_tags({"note": "offline"})
        logger.log_params({"lr": 0.5})
        assert time.monotonic() - start < 1.0
        logger.close("FINISHED")
    stopped = [w for w in caught if "MLflow logging stopped" in str(w.message)]
    assert len(stopped) == 1 and str(logger.spool) in str(stopped[0].message)
    assert not logger.active and (spool / run_id / "calls.jsonl").is_file()

    # the tail of the spool torn by a kill is skipped
    with open(spool / run_id / "calls.jsonl", "a") as f:
        f.write('{"kind": "metrics", "payl')
    assert cli_main(["tracking", "sync", "--tracking-uri", mlflow_uri]) == 0
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(30))  # every step exactly once
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["note"] == "offline" and run.data.params["lr"] == "0.5"
    assert "demar.synced" in run.data.tags
    assert not (spool / run_id).exists() and sync_unsynced(mlflow_uri) == []


@pytest.mark.reliability
def test_a_sync_into_an_unreachable_store_keeps_the_spool(mlflow_uri, spool):
    logger = RunLogger("no-such-run", flush_every=1, uri="http://127.0.0.1:9")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.close("FINISHED")
    assert cli_main(["tracking", "sync"]) == 1  # the run's store is still down
    assert (spool / "no-such-run" / "run.json").is_file()


@pytest.mark.reliability
def test_a_run_of_a_killed_process_is_closed_as_failed_by_the_next_stage(mlflow_uri):
    code = (
        "import sys, time\n"
        "from demar.tracking import stage_run\n"
        "with stage_run('train', row='demar') as run:\n"
        "    print(run.run_id, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        killed = proc.stdout.readline().strip()
        assert mlflow.MlflowClient().get_run(killed).info.status == "RUNNING"
    finally:
        proc.kill()
        proc.wait()
    with stage_run("train", row="demar") as run:
        alive = run.run_id
        assert mlflow.MlflowClient().get_run(alive).info.status == "RUNNING"  # its own run stays open
    runs = mlflow.search_runs(experiment_names=["demar-embedded"]).set_index("run_id")
    assert runs.loc[killed, "status"] == "FAILED" and runs.loc[killed, "tags.demar.closed"]
    assert runs.loc[alive, "status"] == "FINISHED"


# ----------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A real ``mlflow server`` on 127.0.0.1 over a sqlite store; killed with its whole process group."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            shutil.which("mlflow") or "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        self.log = open(root / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / f'server-{self.port}.log').read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError("mlflow server did not start in 180 s")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


@pytest.mark.slow
@pytest.mark.reliability
def test_work_goes_on_when_the_tracking_server_dies_and_sync_replays_it(tmp_path, spool, monkeypatch):
    root = tmp_path / "server"
    root.mkdir()
    server = _Server(root)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        steps, kill_at, step_s = 150, 50, 0.02
        slowest = 0.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with stage_run("train", row="demar", params={"train": {"lr": 0.1}}) as run:
                run.flush_every = 10  # a training loop logging a few values per step
                run_id = run.run_id
                for step in range(steps):
                    if step == kill_at:
                        server.kill()
                        killed = time.monotonic()
                    t0 = time.monotonic()
                    run.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
                    slowest = max(slowest, time.monotonic() - t0)
                    time.sleep(step_s)  # the training step
                loop_end = time.monotonic()
            exit_delay = time.monotonic() - loop_end
    finally:
        server.kill()
    # the loop never waited on the dead server, and the run ended within the bounded wait
    assert slowest < 0.5, f"a logging call blocked for {slowest:.1f} s"
    assert loop_end - killed < (steps - kill_at) * step_s + 5.0
    assert exit_delay < 35.0
    assert len([w for w in caught if "MLflow logging stopped" in str(w.message)]) == 1
    assert not run.active and (spool / run_id / "calls.jsonl").is_file()

    # a new server over the same store: the sync sends what was lost, every step once
    restarted = _Server(root)
    try:
        results = sync_unsynced(restarted.url)
        assert [r.error for r in results] == [None] and results[0].metrics > 0
        client = mlflow.MlflowClient(restarted.url)
        for key in ("loss", "lr"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(steps))
        synced = client.get_run(run_id)
        assert synced.info.status == "FINISHED" and synced.data.params["train.lr"] == "0.1"
        assert not (spool / run_id).exists()
    finally:
        restarted.kill()
