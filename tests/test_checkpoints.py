"""Checkpoints and run identity: safe loading, corrupt files, kills during writes, code-aware resume.

The reliability cases of the training stage: a malicious ``last.pt`` is refused unrun,
a truncated one is set aside, a kill during a write leaves no debris and loses no
record, a read-only or full disk is named, a model of another architecture is refused,
and a run resumes only when its config, latent set and code are unchanged.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from demar.identity import code_digest
from demar.io import (
    UnreadableFileError,
    UnsafeFileError,
    atomic_write_bytes,
    ensure_writable,
    remove_stale_temporaries,
    torch_load,
    torch_save,
)
from demar.model import DeMAR, ModelMismatchError, load_model, save_checkpoint
from demar.train import read_metrics, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import REPO, assert_same_weights, tiny_model_cfg, tiny_train_cfg, weights, write_latents  # noqa: E402

pytestmark = pytest.mark.reliability


@pytest.fixture
def latents(tmp_path) -> Path:
    return write_latents(tmp_path / "latents")


def _run(latents: Path, out: Path, **overrides):
    cfg = tiny_train_cfg(**{"epochs": 1.0, **overrides})  # 4 steps, checkpoints every 2
    return train(tiny_model_cfg("mar"), cfg, latents_dir=latents, out_dir=out, progress=False)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


class _RunsACommand:
    """Unpickling this object would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------- what a checkpoint holds


def test_checkpoints_hold_only_tensors_and_plain_values_with_their_identity(latents, tmp_path):
    result = _run(latents, tmp_path / "run")
    ckpt = torch.load(result.checkpoint_path, weights_only=True)  # would raise on any other object
    assert isinstance(ckpt["rng"]["torch_cpu"], torch.Tensor)
    identity = ckpt["identity"]
    assert identity["code"] == code_digest("demar.train")
    assert identity["config"]["train"]["base_lr"] == tiny_train_cfg().base_lr
    assert identity["run"] == {"device": "cpu", "micro_batches": 2}
    json.dumps(identity)  # plain values only
    model = torch.load(result.model_path, weights_only=True)
    assert model["extra"]["identity"] == identity
    json.dumps(model["config"])


def test_malicious_checkpoint_is_refused_unrun_naming_the_file(latents, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    torch.save({"step": 3, "model": _RunsACommand(marker)}, tmp_path / "evil.pt")
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "evil.pt", out / "checkpoints" / "last.pt")
    with pytest.raises(UnsafeFileError, match=r"last\.pt: refused") as err:
        _run(latents, out)
    assert err.value.path == out / "checkpoints" / "last.pt"
    assert not marker.exists(), "the pickled command ran"
    assert (out / "checkpoints" / "last.pt").is_file(), "the evidence is left where it was"
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------- run identity


def test_finished_run_rerun_does_nothing_and_operational_keys_keep_the_checkpoint(latents, tmp_path, capsys):
    out = tmp_path / "run"
    first = _run(latents, out)
    before = _mtimes(out)
    again = _run(latents, out)
    assert _mtimes(out) == before, "a finished run of the same identity writes nothing"
    assert again.resumed_from == first.metrics["steps"] and again.metrics == first.metrics
    assert again.history == first.history
    # Operational keys: resumed (nothing to do), not restarted.
    capsys.readouterr()
    other = _run(latents, out, log_every=3, checkpoint_every=1, num_workers=1, grad_checkpointing=True)
    assert other.resumed_from == first.metrics["steps"] and not capsys.readouterr().err
    assert _mtimes(out) == before


def test_another_code_identity_starts_fresh_and_says_why(latents, tmp_path, capsys):
    out = tmp_path / "run"
    _run(latents, out)
    path = out / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["identity"]["code"] = "0" * 64  # as written by an earlier version of the code
    torch_save(ckpt, path)
    capsys.readouterr()
    again = _run(latents, out)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "the code (demar.train" in said[0] and "starting a fresh run" in said[0]
    assert again.resumed_from == 0
    assert_same_weights(weights(again.model_path), weights(_run(latents, tmp_path / "straight").model_path))


def test_another_latent_set_starts_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    _run(write_latents(tmp_path / "a"), out, epochs=0.5)
    capsys.readouterr()
    again = _run(write_latents(tmp_path / "b", n=24), out, epochs=0.5)
    assert again.resumed_from == 0 and "the latent set" in capsys.readouterr().err


EDIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import demar
    print("demar from", Path(demar.__file__).parent)
    from demar.model import ModelConfig
    from demar.train import train
    from demar.train_config import TrainConfig
    latents, out, model_json, train_json = sys.argv[1:]
    model_cfg = ModelConfig.model_validate_json(open(model_json).read())
    train_cfg = TrainConfig.model_validate_json(open(train_json).read())
    r = train(model_cfg, train_cfg, latents_dir=latents, out_dir=out, progress=False)
    print("resumed_from", r.resumed_from)
    """
)


@pytest.mark.slow
def test_editing_model_code_retrains_while_docstring_edits_resume(latents, tmp_path):
    """A behaviour change in a module the engine imports retrains; a docstring edit does not."""
    copy = tmp_path / "project"
    for package in ("demar", "pipelines", "reports"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "m.json").write_text(tiny_model_cfg("mar").model_dump_json())
    (tmp_path / "t.json").write_text(tiny_train_cfg(epochs=1.0).model_dump_json())
    (tmp_path / "run.py").write_text(EDIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "out"

    def run() -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(tmp_path / "run.py"), str(latents), str(out), str(tmp_path / "m.json"),
               str(tmp_path / "t.json")]  # fmt: skip
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, check=True)

    started = run().stdout
    assert f"demar from {copy / 'demar'}" in started and "resumed_from 0" in started
    first, before = weights(out / "model.pt"), _mtimes(out)
    backbone = copy / "demar" / "backbone.py"
    text = backbone.read_text()
    doc, line = '"""MAR\'s init:', "std = 0.02  # MAR's"
    assert doc in text and line in text, "the edits below need these lines"
    # Docstring and comment edits keep the identity: the finished run is kept as it is.
    backbone.write_text(text.replace(doc, '"""The initialisation of MAR:').replace(line, "std = 0.02  # as"))
    assert "resumed_from 4" in run().stdout and _mtimes(out) == before
    # A behaviour change (the initial scale of the embeddings) retrains from scratch.
    backbone.write_text(text.replace(line, "std = 0.03  # MAR's"))
    done = run()
    assert "resumed_from 0" in done.stdout and "the code (demar.train" in done.stderr
    changed = weights(out / "model.pt")
    assert any(not torch.equal(first[k], changed[k]) for k in first), "retrained with the edited code"


# ---------------------------------------------------------------------- corrupt files


def test_truncated_checkpoint_is_set_aside_and_training_starts_fresh(latents, tmp_path, capsys):
    out = tmp_path / "run"
    _run(latents, out)
    path = out / "checkpoints" / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    again = _run(latents, out)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and str(path) in said[0] and "last.pt.unreadable" in said[0]
    assert (out / "checkpoints" / "last.pt.unreadable").read_bytes() == data[: len(data) // 2]
    assert again.resumed_from == 0
    assert_same_weights(weights(again.model_path), weights(_run(latents, tmp_path / "straight").model_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, not a torch file\n", "not a readable torch file"),
        (b"", "not a readable torch file"),
        ("truncated", "truncated or corrupt"),
        ("not a model", "not a demar model file"),
    ],
)
def test_every_model_load_error_names_the_file(tmp_path, content, message):
    good = tmp_path / "good.pt"
    save_checkpoint(good, DeMAR(tiny_model_cfg("mar")))
    bad = tmp_path / "bad.pt"
    if content == "truncated":
        content = good.read_bytes()[:-200]
    elif content == "not a model":
        torch.save({"weights": torch.ones(2)}, bad)
        content = bad.read_bytes()
    bad.write_bytes(content)
    with pytest.raises(UnreadableFileError, match=message) as err:
        load_model(bad)
    assert str(bad) in str(err.value) and err.value.path == bad
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


def test_model_of_another_architecture_is_refused_with_the_differences(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, DeMAR(tiny_model_cfg("mar")))
    assert load_model(path, expected=tiny_model_cfg("mar")).cfg == tiny_model_cfg("mar")
    with pytest.raises(ModelMismatchError) as err:
        load_model(path, expected=tiny_model_cfg("demar"))
    text = str(err.value)
    assert str(path) in text
    assert "diffusion_head: 'mlp' in the file, expected 'transformer'" in text
    assert "denoising_head: False in the file, expected True" in text
    wider = tiny_model_cfg("mar").model_copy(update={"token_dim": 8})
    with pytest.raises(ModelMismatchError, match="token_dim: 4 in the file, expected 8"):
        load_model(path, expected=wider)


# ---------------------------------------------------------------------- kills during writes


KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, signal, sys, tempfile
    from pathlib import Path
    import demar.io
    from demar.model import ModelConfig
    from demar.train import train
    from demar.train_config import TrainConfig
    latents, out, model_json, train_json, victim, nth = sys.argv[1:]
    calls = {"n": 0}
    write = demar.io.atomic_write_bytes

    def killed_while_writing(path, data):
        # The n-th write of `victim` dies half-way: a partial temporary file, then SIGKILL.
        if Path(path).name == victim:
            calls["n"] += 1
            if calls["n"] == int(nth):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.{os.getpid()}.",
                                           suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        write(path, data)

    demar.io.atomic_write_bytes = killed_while_writing
    model_cfg = ModelConfig.model_validate_json(open(model_json).read())
    train_cfg = TrainConfig.model_validate_json(open(train_json).read())
    train(model_cfg, train_cfg, latents_dir=latents, out_dir=out, progress=False)
    """
)


@pytest.mark.parametrize("victim", ["metrics.jsonl", "last.pt"])
def test_kill_during_a_checkpoint_write_leaves_no_debris_and_loses_no_record(latents, tmp_path, victim):
    """Killed in the middle of the second checkpoint's writes (step 4), then run again."""
    (tmp_path / "m.json").write_text(tiny_model_cfg("mar").model_dump_json())
    (tmp_path / "t.json").write_text(tiny_train_cfg(epochs=2.0).model_dump_json())  # 8 steps, checkpoints every 2
    (tmp_path / "kill.py").write_text(KILL_DURING_WRITE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "killed"
    cmd = [sys.executable, str(tmp_path / "kill.py"), str(latents), str(out), str(tmp_path / "m.json"),
           str(tmp_path / "t.json"), victim, "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert list(out.rglob(f".{victim}.*.tmp")), "the kill left a temporary file, as a real one does"
    step = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert all(r["step"] <= 4 for r in read_metrics(out / "metrics.jsonl"))
    assert {r["step"] for r in read_metrics(out / "metrics.jsonl")} >= set(range(1, step + 1)), "records lost"

    resumed = train(tiny_model_cfg("mar"), tiny_train_cfg(epochs=2.0), latents_dir=latents, out_dir=out,
                    progress=False)  # fmt: skip
    straight = train(tiny_model_cfg("mar"), tiny_train_cfg(epochs=2.0), latents_dir=latents,
                     out_dir=tmp_path / "straight", progress=False)  # fmt: skip
    assert resumed.resumed_from == step == 2
    assert not list(out.rglob("*.tmp")), "debris left after the next start"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert_same_weights(weights(resumed.model_path), weights(straight.model_path))


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / f".last.pt.{dead_pid}.abc123.tmp", tmp_path / "sub" / f".shard_00000.pt.{dead_pid}.x1.tmp"]
    live = tmp_path / f".metrics.jsonl.{os.getpid()}.zz9.tmp"
    keep = [tmp_path / "model.pt", tmp_path / "notes.tmp"]
    for path in (*stale, live, *keep):
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in (live, *keep)) and not any(p.exists() for p in stale)


# ---------------------------------------------------------------------- unwritable outputs


def test_disk_full_during_a_write_names_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "checkpoints" / "last.pt"
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(OSError, match=r"cannot write .*last\.pt") as err:
            atomic_write_bytes(target, b"\0" * (1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert err.value.filename == str(target)
    assert not target.exists() and not list(target.parent.iterdir()), "no temporary left behind"


def test_unwritable_output_is_an_error_naming_it_before_any_work(latents, tmp_path):
    blocker = tmp_path / "models"
    blocker.write_text("a file where the output folder goes")
    with pytest.raises(PermissionError, match="models"):
        ensure_writable(blocker / "demar")
    with pytest.raises(PermissionError, match="models"):
        _run(latents, blocker / "demar")
    ensure_writable(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists(), "checking creates nothing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_metrics_folder_stops_the_stage_before_training(latents, tmp_path):
    from test_train import run_stage, stage_params

    stage_params(tmp_path)
    assert latents == tmp_path / "latents"  # where the stage reads them
    (tmp_path / "metrics" / "train").mkdir(parents=True)
    (tmp_path / "metrics" / "train").chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="metrics/train"):
            run_stage(tmp_path)
    finally:
        (tmp_path / "metrics" / "train").chmod(0o755)
    assert not (tmp_path / "models" / "tiny_demar" / "checkpoints").exists()


def test_stage_with_a_file_in_place_of_the_metrics_folder_fails_before_training(latents, tmp_path, monkeypatch):
    from test_train import run_stage, stage_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    stage_params(tmp_path)
    assert latents == tmp_path / "latents"  # where the stage reads them
    (tmp_path / "metrics").write_text("not a folder")
    with pytest.raises(PermissionError, match="metrics"):
        run_stage(tmp_path)
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "mlflow.db").exists(), "no tracking before the check"


def test_torch_load_reads_tensors_and_names_missing_files(tmp_path):
    torch_save({"a": torch.arange(3), "b": [1, "x", 2.5]}, tmp_path / "ok.pt")
    loaded = torch_load(tmp_path / "ok.pt")
    assert torch.equal(loaded["a"], torch.arange(3)) and loaded["b"] == [1, "x", 2.5]
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        torch_load(tmp_path / "nothing.pt")
    assert not list(Path(tempfile.gettempdir()).glob(".ok.pt.*.tmp"))
