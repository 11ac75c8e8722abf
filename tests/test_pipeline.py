"""End to end: `dvc repro` of the smoke preset in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from demar.io import torch_load
from demar.params import apply_preset, list_presets, load_params

ROOT = Path(__file__).resolve().parent.parent


def test_every_preset_validates_and_params_yaml_is_the_embedded_preset():
    names = list_presets()
    assert {"embedded", "smoke", "imagenet256_b", "imagenet256_l", "imagenet256_h"} <= set(names)
    for name in names:
        assert load_params(ROOT / "presets" / f"{name}.yaml").preset == name
    assert (ROOT / "params.yaml").read_text() == (ROOT / "presets" / "embedded.yaml").read_text()


def test_apply_preset_rejects_unknown_names_and_keeps_the_file(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text("keep me\n")
    from demar.config import ConfigError

    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        apply_preset("nope", target)
    assert target.read_text() == "keep me\n"
    apply_preset("smoke", target)
    assert yaml.safe_load(target.read_text())["preset"] == "smoke"


def test_unknown_top_level_key_is_an_error(tmp_path):
    from demar.config import ConfigError

    data = yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text())
    data["trian"] = {}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_params(p)


def _copy_repository(dest: Path, leave_out: tuple[str, ...] = ()) -> None:
    """Copy the repository's files (but those under ``leave_out`` prefixes) into a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, files):
        if rel.startswith(leave_out):
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=dest, check=True
    )


def _dvc(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(dvc), *args], cwd=cwd, env=env, capture_output=True, text=True)


def _git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _verify(repo: Path, env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """``demar verify`` in ``repo``: (exit status, {stage: verdict}, output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "demar.cli", "verify"], cwd=repo, env=env, capture_output=True, text=True
    )
    verdicts = {}
    for line in proc.stdout.splitlines():
        if line and not line.startswith(" ") and "  " in line:
            stage, verdict = line.split(None, 1)
            verdicts[stage] = verdict.split(";")[0]
    return proc.returncode, verdicts, proc.stdout + proc.stderr


def _check_metrics_plots_and_verify(repo: Path, env: dict[str, str]) -> None:
    """Metrics committed to git, `dvc plots`, `dvc metrics diff` and `demar verify` on a reproduced run."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        declared = {o.def_path for s in dvc_repo.index.stages for o in s.outs}
    in_metrics = set(_git(["ls-files", "--cached", "--others", "--exclude-standard", "metrics"], repo).split())
    assert in_metrics and in_metrics <= declared, f"undeclared files in metrics/: {in_metrics - declared}"
    _git(["add", "-A"], repo)
    _git(["commit", "-qm", "reproduced"], repo)
    committed = set(_git(["ls-files", "metrics"], repo).split())
    assert {"metrics/tokenizer.json", "metrics/train/mar.json", "metrics/evaluate/demar.json",
            "metrics/time_fid/mar.json"} <= committed, committed  # fmt: skip

    status, verdicts, out = _verify(repo, env)
    assert status == 0 and set(verdicts.values()) == {"identical"}, out
    assert {"train_tokenizer", "train@mar", "evaluate@demar", "report"} <= set(verdicts), out

    shown = _dvc(["plots", "show", "-o", "dvc_plots"], repo, env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "fig4a_time_fid.png" in page and "fig_train_curves.png" in page
    series = _dvc(["plots", "show", "--json"], repo, env)
    assert series.returncode == 0, series.stderr
    data = json.dumps(json.loads(series.stdout))
    for name in ("train_curves/mar.csv", "train_curves/demar.csv", "time_fid/mar.csv"):
        assert name in data, f"{name} is not among the plots"

    # A re-run of a stage reproduces it: identical, or within the stated tolerances.
    rerun = _dvc(["repro", "-f", "-s", "evaluate@mar"], repo, env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    status, verdicts, out = _verify(repo, env)
    assert status == 0 and verdicts["evaluate@mar"] in ("identical", "within tolerance"), out

    # A result that moved is caught, by `dvc metrics diff` and by the check.
    path = repo / "metrics" / "evaluate" / "mar.json"
    record = json.loads(path.read_text())
    record["fid"] = 2 * record["fid"] + 1
    path.write_text(json.dumps(record))
    assert _dvc(["commit", "-f", "evaluate@mar"], repo, env).returncode == 0
    diff = _dvc(["metrics", "diff", "HEAD", "--json"], repo, env)
    assert diff.returncode == 0, diff.stderr
    assert "fid" in json.loads(diff.stdout)["metrics/evaluate/mar.json"], diff.stdout
    status, verdicts, out = _verify(repo, env)
    assert status == 1 and verdicts["evaluate@mar"] == "differs" and "fid" in out, out
    assert verdicts["evaluate@demar"] == "identical", out
    _git(["checkout", "-q", "HEAD", "--", "metrics", "dvc.lock"], repo)
    shutil.rmtree(repo / "dvc_plots")


@pytest.mark.slow
def test_smoke_dvc_repro_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repository(repo, leave_out=("metrics/",))  # the committed embedded run's; the smoke run writes its own
    apply_preset("smoke", repo / "params.yaml", repo / "presets")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(repo),
    }
    env.pop("MLFLOW_TRACKING_URI", None)

    # Two stages at a time (`demar repro --jobs 2`): both rows train side by side.
    first = subprocess.run(
        [sys.executable, "-m", "demar.cli", "repro", "--jobs", "2"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert _dvc(["status", "--json"], repo, env).stdout.strip() == "{}", "dvc.lock records every stage"

    out = repo / "reports" / "out"
    for name in ["table4.md", "table4.tex", "table4.csv", "table2.md", "fig4a_time_fid.png",
                 "fig4b_params_fid.svg", "index.html", "mlflow_runs.csv"]:  # fmt: skip
        assert (out / name).is_file(), name
    evaluated = json.loads((repo / "metrics" / "evaluate" / "demar.json").read_text())
    assert evaluated["row"] == "demar" and evaluated["fid"] >= 0

    # One MLflow run per stage and row, all sharing one reproduction id.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["demar-smoke"])
    stages = set(runs["tags.demar.stage"])
    assert {"prepare_data", "train_tokenizer", "extract_latents", "train_classifier", "train@demar",
            "sample@mar", "evaluate@demar", "time_fid@mar", "report"} <= stages  # fmt: skip
    assert runs["tags.demar.repro_id"].nunique() == 1
    mlflow.set_tracking_uri(None)

    _check_metrics_plots_and_verify(repo, env)

    # A row trained beside another has the weights, EMA and checkpoint of a lone run.
    lone = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--row", "mar", "--models", str(tmp_path / "lone"),
         "--metrics", str(tmp_path / "lone_metrics"), "--no-progress"],
        cwd=repo, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert lone.returncode == 0, lone.stdout[-3000:] + lone.stderr[-3000:]
    assert _same_tensors(_weights(repo / "models" / "mar" / "model.pt"), _weights(tmp_path / "lone" / "mar" / "model.pt"))
    checkpoint = Path("checkpoints") / "last.pt"
    assert _same_tensors(
        torch_load(repo / "models" / "mar" / checkpoint), torch_load(tmp_path / "lone" / "mar" / checkpoint)
    ), "the checkpoint (weights, EMA, optimizer) of the side-by-side run equals the lone run's"

    # A second repro does nothing.
    start = time.perf_counter()
    again = _dvc(["repro"], repo, env)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout
    assert time.perf_counter() - start < 60

    # Changing one row's param re-runs only the params check, that row's stages and the report.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["rows"]["mar"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _dvc(["status", "--json"], repo, env)
    changed = set(json.loads(status.stdout))
    row_stages = {f"{stage}@mar" for stage in ("train", "sample", "evaluate", "diagnose", "time_fid")}
    assert changed == {"check_params", *row_stages, "report"}, changed

    # A behaviour-changing edit of a model module retrains and resamples the row; nothing stale is kept.
    _git(["checkout", "-q", "HEAD", "--", "params.yaml"], repo)
    model_file, samples = repo / "models" / "mar" / "model.pt", repo / "samples" / "mar"
    weights, images, manifest = _weights(model_file), _images(samples), (samples / "manifest.json").read_text()
    backbone = repo / "demar" / "backbone.py"
    line = "std = 0.02  # MAR's"
    assert line in backbone.read_text(), "the edit below needs this line"
    backbone.write_text(backbone.read_text().replace(line, "std = 0.2  # MAR's"))
    edited = _dvc(["repro", "sample@mar"], repo, env)
    assert edited.returncode == 0, edited.stdout[-3000:] + edited.stderr[-3000:]
    assert "train@mar" in edited.stdout and "the code" in edited.stderr, edited.stdout[-3000:]
    retrained = _weights(model_file)
    assert any(not torch.equal(weights[k], retrained[k]) for k in weights), "trained again with the edited code"
    assert (samples / "manifest.json").read_text() != manifest, "sampled again from the retrained model"
    assert _images(samples) != images, "the new model draws other images"


def _images(folder: Path) -> list[bytes]:
    """The bytes of a sample folder's images, in order."""
    return [p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))]

def _same_tensors(a: object, b: object) -> bool:
    """Whether two nested checkpoints hold equal tensors under the same keys (other values are ignored)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_tensors, a, b))
    return True


def _weights(path: Path) -> dict:
    """The EMA weights of a model file."""
    from demar.model import load_model

    return {k: v.clone() for k, v in load_model(path).state_dict().items()}
