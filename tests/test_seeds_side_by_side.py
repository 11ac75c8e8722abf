"""Seeds of one row trained side by side, one single-threaded stage process each (what
``demar repro --jobs 2`` does with the rows of ``params.yaml``): every seed ends with the
weights, EMA, metrics and MLflow record of a lone run of that seed, and a seed killed
in the middle of the side-by-side run resumes from its checkpoint to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_train import REPO, assert_same_weights, stage_params, weights, write_latents

from demar.repro import create_tracking_store
from demar.tracking import UNSYNCED_ENV

SEEDS = (0, 1, 2)
STEPS = 40  # 10 epochs of 32 images at batch 8


def write_params(root: Path) -> Path:
    """The train stage's test params (tests/test_train.py) with three rows that differ only in the seed."""
    path = stage_params(root, epochs=10.0, warmup_epochs=1.0, checkpoint_every=5, log_every=5)  # 40 steps
    params = yaml.safe_load(path.read_text())
    params["rows"] = {f"s{seed}": {"ablation": "demar", "size": "tiny", "seed": seed} for seed in SEEDS}
    path.write_text(yaml.safe_dump(params))
    return path


def stage_args(root: Path, group: str, seed: int) -> list[str]:
    """The arguments of the stage ``train@s<seed>``, writing under ``root/group``."""
    return ["--row", f"s{seed}", "--params", str(root / "params.yaml"), "--latents", str(root / "latents"),
            "--tokenizer", str(root / "no_tokenizer.pt"), "--models", str(root / group / "models"),
            "--metrics", str(root / group / "metrics"), "--no-progress"]  # fmt: skip


def start_stage(root: Path, group: str, seed: int) -> subprocess.Popen:
    """``python -m pipelines.train --row s<seed>`` in its own process on one thread, writing under ``root/group``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / group / 'mlflow.db'}",
        UNSYNCED_ENV: str(root / group / "unsynced"),
    }
    cmd = [sys.executable, "-m", "pipelines.train", *stage_args(root, group, seed)]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # not written yet, or being replaced this instant
        return -1


def finished_runs(store: Path) -> dict[str, dict]:
    """Seed -> the final metrics and the logged ``loss`` steps of that seed's FINISHED training run in ``store``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("demar-testing").experiment_id])
    out: dict[str, dict] = {}
    for run in runs:
        if run.info.status == "FINISHED":
            seed = run.data.tags["demar.seed"]
            assert seed not in out, f"two finished runs of seed {seed}"
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
            out[seed] = {"metrics": run.data.metrics, "loss_steps": steps}
    return out


@pytest.mark.slow
@pytest.mark.reliability
def test_seeds_side_by_side_equal_lone_runs_and_a_killed_seed_resumes(tmp_path, monkeypatch):
    write_latents(tmp_path / "latents")
    write_params(tmp_path)
    for group in ("side", "alone"):  # as `demar repro --jobs 2` does before stages run side by side
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / group / 'mlflow.db'}")
        assert create_tracking_store(tmp_path) == tmp_path / group / "mlflow.db"
    # Side by side: three stage processes at once; seed 1 is killed once it has checkpointed step 10.
    procs = {seed: start_stage(tmp_path, "side", seed) for seed in SEEDS}
    victim = tmp_path / "side" / "models" / "s1" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and procs[1].poll() is None and checkpoint_step(victim) < 10:
            time.sleep(0.02)
        assert procs[1].poll() is None, f"seed 1 ended before it could be killed: {procs[1].communicate()[1][-3000:]}"
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
    except BaseException:
        for proc in procs.values():
            proc.kill()
        raise
    killed_at = checkpoint_step(victim)
    assert 10 <= killed_at < STEPS and not (tmp_path / "side" / "models" / "s1" / "model.pt").exists()
    finish(procs[0])
    finish(procs[2])
    finish(start_stage(tmp_path, "side", 1))  # the rerun resumes from the killed run's checkpoint

    # Alone: each seed by itself, one after the other, in this process (also one thread).
    from pipelines.train import main as train_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'alone' / 'mlflow.db'}")
    monkeypatch.setenv(UNSYNCED_ENV, str(tmp_path / "alone" / "unsynced"))
    assert torch.get_num_threads() == 1
    for seed in SEEDS:
        assert train_stage(stage_args(tmp_path, "alone", seed)) == 0

    side_runs = finished_runs(tmp_path / "side" / "mlflow.db")
    alone_runs = finished_runs(tmp_path / "alone" / "mlflow.db")
    assert set(side_runs) == set(alone_runs) == {str(s) for s in SEEDS}
    for seed in SEEDS:
        side, alone = (tmp_path / group / "models" / f"s{seed}" / "model.pt" for group in ("side", "alone"))
        assert_same_weights(weights(side), weights(alone))
        assert_same_weights(weights(side, use_ema=True), weights(alone, use_ema=True))
        record = {g: json.loads((tmp_path / g / "metrics" / f"s{seed}.json").read_text()) for g in ("side", "alone")}
        assert record["side"]["steps"] == record["alone"]["steps"] == STEPS
        assert record["side"]["loss"] == record["alone"]["loss"]
        assert side_runs[str(seed)]["metrics"]["final/loss"] == alone_runs[str(seed)]["metrics"]["final/loss"]
        assert alone_runs[str(seed)]["loss_steps"] == list(range(5, STEPS + 1, 5))
    # Seed 1's finished run is the rerun, which logged only the steps after the killed run's checkpoint:
    # it resumed rather than starting again.
    assert side_runs["1"]["loss_steps"] == list(range(killed_at + 5, STEPS + 1, 5))
    assert side_runs["0"]["loss_steps"] == side_runs["2"]["loss_steps"] == list(range(5, STEPS + 1, 5))
    # The seeds differ from one another: the side-by-side processes did not share a stream.
    w0, w2 = (weights(tmp_path / "side" / "models" / f"s{s}" / "model.pt") for s in (0, 2))
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)
