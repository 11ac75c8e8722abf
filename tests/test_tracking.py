from __future__ import annotations

import mlflow
import pytest

from demar.tracking import TrackingError, flatten, stage_run


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
    assert row["metrics.loss"] == pytest.approx(0.2)
    history = mlflow.MlflowClient().get_metric_history(row["run_id"], "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]


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


def test_tracking_failure_mid_run_only_warns(mlflow_uri):
    from demar.tracking import RunLogger

    logger = RunLogger("no-such-run", flush_every=1)
    with pytest.warns(RuntimeWarning, match="tracking is off"):
        logger.log_metrics({"loss": 1.0}, step=0)
    assert not logger.active
    logger.log_metrics({"loss": 2.0}, step=1)  # dropped silently, no exception
