"""Optuna studies (demar.studies): configs, storage, workers, resume, failures, MLflow runs, reports.

The studies run the real library end to end on a tiny setup built once per session:
embedded shapes at 32x32, a random-weight tokenizer bundle, its latent cache written
by the real latents writer, the embedded classifier as FID's feature extractor, and
a tiny De-MAR trained for a few steps by the real ``train``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from PIL import Image

from demar.classifier import ClassifierConfig, dataset_to_tensors, save_classifier, train_classifier
from demar.config import ConfigError
from demar.data.embedded import EmbeddedConfig, EmbeddedDataset, write_split
from demar.latents import LatentsConfig, extract_latents
from demar.studies.base import check_space, resolve_base
from demar.studies.cli import main
from demar.studies.config import StudyConfig, load_study_config
from demar.studies.objectives import OBJECTIVES
from demar.studies.report import stored_study_name
from demar.studies.runner import quotas, run_study
from demar.studies.search import make_sampler
from demar.studies.storage import PARENT_RUN_ATTR, TRIAL_RUN_ATTR, default_storage, open_storage, redact
from demar.tokenizer import Tokenizer, TokenizerConfig, file_sha256
from demar.params import RowConfig, row_model_config
from demar.train import train
from demar.train_config import TrainConfig
from reports.study_results import best_trials_table, load_study_results, studies_html

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "embedded.yaml"
NUM_CLASSES = 10  # the embedded data set's shapes


def build_assets(root: Path) -> Path:
    """Write params.yaml, tokenizer, latents, classifier, reference images and a trained tiny checkpoint."""
    emb = EmbeddedConfig(resolution=32, num_train=40, num_reference=40)
    write_split(emb, "train", root / "train", progress=False)
    write_split(emb, "reference", root / "reference_split", progress=False)

    torch.manual_seed(0)
    tok_cfg = TokenizerConfig(
        resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, decoder_res_blocks=1, attn_resolutions=(),
        z_channels=4, embed_dim=4, norm_groups=4,
    )  # fmt: skip
    Tokenizer(tok_cfg, scale=0.5).save(root / "tokenizer.pt")
    extract_latents(
        Tokenizer.load(root / "tokenizer.pt"), EmbeddedDataset(root / "train"), root / "latents",
        LatentsConfig(shard_size=64, batch_size=20), tokenizer_sha256=file_sha256(root / "tokenizer.pt"),
        num_classes=NUM_CLASSES, progress=False,
    )  # fmt: skip

    images, labels = dataset_to_tensors(EmbeddedDataset(root / "train", output="uint8"))
    clf_cfg = ClassifierConfig(channels=(8, 16), feature_dim=8, epochs=1, batch_size=20)
    save_classifier(root / "classifier.pt", train_classifier(clf_cfg, images, labels, progress=False))
    (root / "reference").mkdir()
    ref_images, _ = dataset_to_tensors(EmbeddedDataset(root / "reference_split", output="uint8"))
    for i, image in enumerate(ref_images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "reference" / f"{i:03d}.png")

    params = yaml.safe_load(PRESET.read_text())  # a complete, valid file
    params.update(
        preset="studytest",
        rows={"demar": {"ablation": "demar", "size": "tiny", "seed": 0}},
        train={
            "batch_size": 8, "base_lr": 1e-3, "epochs": 1.0, "warmup_epochs": 0.0, "ema_rate": 0.5,
            "log_every": 1, "checkpoint_every": 100, "num_workers": 0, "device": "cpu",
        },
        sample={
            "num_images": 10, "batch_size": 5, "untrained_num_images": 10, "grid_size": 2,
            "sampler": {"num_iter": 2, "diffusion_steps": 3},
        },
        evaluate={
            "weights_path": str(root / "classifier.pt"), "reference": str(root / "reference"),
            "metrics": ["fid"], "batch_size": 20, "cache_dir": str(root / "fid_cache"),
        },
    )  # fmt: skip
    params["model"].update(token_dim=4, seq_len=64, patch_size=1, num_classes=NUM_CLASSES)
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    row = RowConfig.model_validate(params["rows"]["demar"])
    train_cfg = TrainConfig.model_validate({**params["train"], "seed": row.seed})
    result = train(
        row_model_config(row, params["model"]), train_cfg, latents_dir=root / "latents",
        out_dir=root / "models" / "demar", progress=False,
    )  # fmt: skip
    assert result.metrics["steps"] == 5  # one epoch of 40 images at batch 8
    return root


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The session's tiny setup (:func:`build_assets`)."""
    return build_assets(tmp_path_factory.mktemp("study_assets"))


@pytest.fixture(scope="session")
def session_mlflow(tmp_path_factory):
    """One MLflow store for the end-to-end tests (its tables are made once); each test's runs
    are told apart by their study's parent run. Spawned workers inherit the variable."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('study_mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(None)


ENQUEUED = {"sample.sampler.cfg": 1.5, "sample.sampler.cfg_schedule": "linear", "sample.sampler.num_iter": 3}
"""A point of :func:`write_study`'s space."""


def write_study(path: Path, assets: Path, **overrides) -> Path:
    """A tiny cfg study (sampling objective) on the session's checkpoint, as a YAML file."""
    study = {
        "name": "cfg_test",
        "objective": "sampling",
        "objectives": {"fid": "minimize", "sec_per_image": "minimize"},
        "sampler": {"kind": "random", "seed": 0},
        "pruner": {"kind": "none"},
        "n_trials": 4,
        "base": {
            "params": str(assets / "params.yaml"), "row": "demar",
            "checkpoint": str(assets / "models" / "demar" / "model.pt"), "tokenizer": str(assets / "tokenizer.pt"),
        },  # fmt: skip
        "budget": {"images": 10},
        "space": {
            "sample.sampler.cfg": {"type": "float", "low": 1.0, "high": 4.0},
            "sample.sampler.cfg_schedule": {"type": "categorical", "choices": ["linear", "constant"]},
            "sample.sampler.num_iter": {"type": "int", "low": 2, "high": 4},
        },
    }
    study.update(overrides)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def trial_runs(parent_id: str):
    """MLflow runs whose parent is ``parent_id``."""
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def load(config: Path) -> optuna.Study:
    cfg = load_study_config(config)
    url = default_storage(config, cfg.name)
    return optuna.load_study(study_name=stored_study_name(cfg, url), storage=open_storage(url))


# ----------------------------------------------------------------------------- configuration


def test_unknown_keys_are_errors_naming_key_and_file(tmp_path, assets):
    path = write_study(tmp_path / "s.yaml", assets, n_trails=3)
    with pytest.raises(ConfigError, match=r"s\.yaml(.|\n)*n_trails: unknown key"):
        load_study_config(path)
    typo = {"sample.sampler.cfg": {"type": "float", "low": 1, "hihg": 2}}
    path = write_study(tmp_path / "s.yaml", assets, space=typo)
    with pytest.raises(ConfigError, match=r"space\.sample\.sampler\.cfg\.hihg: unknown key"):
        load_study_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objectives": {"fid": "minimize", "speed": "maximize"}}, "unknown value"),
        ({"pruner": {"kind": "median"}}, r"pruner: Value error, pruning needs a single objective"),
        ({"space": {"train.base_lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}, r"space: .*'train.base_lr'"),
        ({"space": {"sample.sampler.cfg": {"type": "float", "low": 0.0, "high": 2.0, "log": True}}}, "low > 0"),
        ({"space": {"sample.sampler.cfg_schedule": {"type": "categorical", "choices": []}}}, "non-empty 'choices'"),
        ({"budget": {"images": 10, "train_steps": 5}}, r"budget: Value error, train_steps: used by the training"),
        ({"enqueue": [{"sample.sampler.cfg": 2.0}]}, r"enqueue\[0\] must set every space key: missing \['sample.sampler.cfg_sch"),
        ({"enqueue": [{**ENQUEUED, "sample.sampler.cfg": 9.0}]}, r"enqueue\[0\].sample.sampler.cfg = 9.0 lies outside"),
        ({"enqueue": [ENQUEUED, {**ENQUEUED, "sample.sampler.num_iter": 2.5}]}, r"enqueue\[1\].sample.sampler.num_iter"),
        ({"enqueue": [{**ENQUEUED, "sample.sampler.cfg_schedule": "cosine"}]}, r"cfg_schedule = 'cosine' lies outside"),
    ],
)
def test_invalid_study_files_are_rejected(tmp_path, assets, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_study_config(write_study(tmp_path / "s.yaml", assets, **overrides))


def _dotted(configs: dict, key: str):
    section, *path = key.split(".")
    value = configs[section]
    for name in path:
        value = getattr(value, name)
    return value


def test_shipped_study_files_fit_the_embedded_preset():
    noise = load_study_config(REPO / "studies" / "noise_schedule.yaml")
    cfg = load_study_config(REPO / "studies" / "cfg.yaml")
    assert noise.objective == "training" and noise.directions == ["minimize"] and noise.pruner.kind == "median"
    assert {"model.noise_injection.max_step", "model.diffusion.schedule", "model.lambda_refine"} <= set(noise.space)
    assert cfg.objective == "sampling" and list(cfg.objectives) == ["fid", "sec_per_image"]
    shipped = sorted((REPO / "studies").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"cfg", "cfg_mar", "noise_schedule", "reference_mar", "reference_demar"}
    for path in shipped:  # every bound and choice is a valid value of the preset's configs
        study = load_study_config(path)
        study = study.model_copy(update={"base": study.base.model_copy(update={"params": str(PRESET)})})
        base = resolve_base(study, check_files=False)
        check_space(study, base, source=study.name)
        assert base.preset == "embedded"
        if study.name in ("cfg", "cfg_mar", "noise_schedule"):  # trial 0 is the preset's own setting
            assert study.enqueue[0] == {key: _dotted(base.configs, key) for key in study.space}, study.name
    for row in ("mar", "demar"):  # the yardsticks train as the noise study does, one trial per seed
        ref = load_study_config(REPO / "studies" / f"reference_{row}.yaml")
        assert ref.base.row == row and ref.budget == noise.budget
        assert sorted(p["train.seed"] for p in ref.enqueue) == [0, 1, 2] and ref.n_trials == 3


def test_a_space_key_naming_no_field_fails_before_any_trial(tmp_path, assets, session_mlflow):
    bad = {"sample.sampler.cfg_scale": {"type": "float", "low": 1.0, "high": 2.0}}
    path = write_study(tmp_path / "s.yaml", assets, space=bad)
    with pytest.raises(ConfigError, match=r"sample\.sampler\.cfg_scale: unknown key"):
        run_study(path, work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "cfg_test.db").exists()  # nothing was created


def test_seeded_sampler_is_reproducible_and_never_repeats_across_trials():
    cfg = StudyConfig.model_validate(
        {"name": "x", "objective": "sampling", "objectives": {"fid": "minimize"}, "n_trials": 1,
         "base": {"row": "r"}, "budget": {"images": 10}, "sampler": {"kind": "random", "seed": 3},
         "space": {"sample.sampler.cfg": {"type": "float", "low": 1.0, "high": 4.0}}}
    )  # fmt: skip

    def draws(n: int) -> list[float]:
        study = optuna.create_study(sampler=make_sampler(cfg.sampler))
        study.optimize(lambda t: cfg.space["sample.sampler.cfg"].suggest(t, "cfg"), n_trials=n)
        return [t.params["cfg"] for t in study.trials]

    first = draws(5)
    assert draws(5) == first  # same seed, same trials
    assert len(set(first)) == 5


def test_trials_are_shared_out_among_workers():
    assert quotas(4, 2) == [2, 2]
    assert quotas(5, 2) == [3, 2]
    assert quotas(1, 3) == [1]  # idle workers are not started
    assert quotas(0, 2) == [] and quotas(-2, 2) == []  # the study already holds its trials


def test_a_path_without_scheme_is_a_journal_storage(tmp_path):
    path = str(tmp_path / "shared" / "s.log")
    optuna.create_study(study_name="j", storage=open_storage(path)).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2
    )
    assert isinstance(open_storage(path), optuna.storages.JournalStorage)
    assert len(optuna.load_study(study_name="j", storage=open_storage(path)).trials) == 2


def test_redact_hides_passwords():
    assert redact("postgresql://optuna:s3cret@db.example:5432/studies") == "postgresql://optuna:***@db.example:5432/studies"
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_workers_run_one_study_under_one_parent_run(tmp_path, assets, session_mlflow):
    config = write_study(tmp_path / "cfg_test.yaml", assets, n_trials=4, enqueue=[ENQUEUED])
    report = run_study(config, workers=2, work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False)

    study = load(config)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert trials[0].params == ENQUEUED  # the enqueued point runs first, once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no repeated draws
    workers = Counter(t.user_attrs["worker"] for t in trials)
    assert sorted(workers.values()) == [2, 2]  # the 4 trials shared out between the 2 processes
    assert all(int(w.rsplit(":", 1)[1]) != os.getpid() for w in workers)

    parent = study.user_attrs[PARENT_RUN_ATTR]
    runs = trial_runs(parent)
    assert len(runs) == 4
    assert sorted(runs["tags.demar.trial"].astype(int)) == [0, 1, 2, 3]
    assert set(runs["status"]) == {"FINISHED"} and set(runs["tags.demar.trial_state"]) == {"COMPLETE"}
    assert runs["metrics.fid"].notna().all() and (runs["metrics.sec_per_image"] > 0).all()
    client = mlflow.MlflowClient()
    for run_id in runs["run_id"]:
        assert [a.path for a in client.list_artifacts(run_id, "images")] == ["images/grid.png"]
    storage = f"sqlite:///{tmp_path / 'cfg_test.db'}"
    parents = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`demar.study_storage` = '{storage}'")
    assert list(parents["run_id"]) == [parent]

    # the report: Pareto front of (fid, sec_per_image), plots, table, all on the parent run too
    assert report.counts == {"COMPLETE": 4}
    front = {t.number for t in study.best_trials}
    assert {b["number"] for b in report.best} == front and front
    names = {p.name for p in report.files}
    assert {"pareto_front.png", "history_fid.png", "history_sec_per_image.png", "importances_fid.png",
            "trials.csv", "best_trials.json"} <= names  # fmt: skip
    logged = {a.path for a in client.list_artifacts(parent, "study")}
    assert {f"study/{n}" for n in names} == logged
    assert client.get_run(parent).data.metrics["pareto_size"] == len(front)

    # best_trials.json says what the trials cost and which files they started from
    summary = json.loads((tmp_path / "out" / "best_trials.json").read_text())
    assert summary["stored_as"] == study.study_name and summary["row"] == "demar"
    durations = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    assert summary["trial_seconds"] == pytest.approx(durations, abs=0.1)
    assert 0 < summary["wall_seconds"] < summary["trial_seconds"]  # two workers overlap
    checkpoint = assets / "models" / "demar" / "model.pt"
    assert summary["inputs"]["checkpoint"] == {"path": checkpoint.as_posix(), "sha256": file_sha256(checkpoint)}

    # the report page's section: the front, the plots, the cost; a changed input is flagged
    (result,) = load_study_results(tmp_path)
    assert result.name == "cfg_test" and result.stale == []
    assert sorted(best_trials_table(result)["trial"]) == sorted(front)
    assert result.plots[0].name == "pareto_front.png"
    html = studies_html([result])
    assert "Pareto front" in html and html.count("<img") == len(result.plots) and 'class="note"' not in html
    summary["inputs"]["checkpoint"]["sha256"] = "0" * 64
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "best_trials.json").write_text(json.dumps(summary))
    older = [r for r in load_study_results(tmp_path) if r.folder.name == "older"][0]
    assert len(older.stale) == 1 and "has changed since the study ran" in older.stale[0]
    assert "has changed since the study ran" in studies_html([older])


@pytest.mark.slow
def test_running_again_continues_the_trial_count(tmp_path, assets, session_mlflow):
    config = write_study(tmp_path / "cfg_test.yaml", assets)
    common = ["--config", str(config), "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    common.append("--no-progress")
    assert main(["run", "cfg_test", "--n-trials", "2", *common]) == 0
    study = load(config)
    assert len(study.trials) == 2
    parent = study.user_attrs[PARENT_RUN_ATTR]

    assert main(["run", "cfg_test", "--n-trials", "4", *common]) == 0
    assert main(["run", "cfg_test", "--n-trials", "4", *common]) == 0  # already there: no new trial
    study = load(config)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.user_attrs[PARENT_RUN_ATTR] == parent
    assert len(trial_runs(parent)) == 4
    assert main(["report", "cfg_test", "--config", str(config), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "pareto_front.png").is_file()


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, assets, session_mlflow, monkeypatch):
    sampling = OBJECTIVES["sampling"]

    def first_trial_fails(ctx):
        if ctx.trial.number == 0:
            raise RuntimeError("trial 0 fails")
        return sampling(ctx)

    monkeypatch.setitem(OBJECTIVES, "sampling", first_trial_fails)
    config = write_study(tmp_path / "cfg_test.yaml", assets, n_trials=2)
    report = run_study(config, work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False)

    states = {t.number: t.state for t in load(config).trials}
    assert states == {0: optuna.trial.TrialState.FAIL, 1: optuna.trial.TrialState.COMPLETE}
    assert report.counts == {"COMPLETE": 1, "FAIL": 1}
    runs = trial_runs(report.parent_run_id).set_index("tags.demar.trial")
    assert runs.loc["0", "status"] == "FAILED" and runs.loc["0", "tags.demar.trial_state"] == "FAIL"
    assert runs.loc["1", "status"] == "FINISHED" and runs.loc["1", "metrics.fid"] >= 0
    assert not list((tmp_path / "work").iterdir())  # every trial's scratch folder is removed


@pytest.mark.slow
def test_training_study_reports_intermediate_fid_and_prunes(tmp_path, assets, session_mlflow):
    study_file = {
        "name": "noise_test", "objective": "training", "objectives": {"fid": "minimize"}, "pruner": {"kind": "none"},
        "base": {"params": str(assets / "params.yaml"), "row": "demar", "tokenizer": str(assets / "tokenizer.pt"),
                 "latents": str(assets / "latents")},
        "budget": {"train_steps": 4, "eval_every": 2, "eval_images": 10, "images": 10},
        "space": {"model.noise_injection.max_step": {"type": "int", "low": 1, "high": 500, "log": True},
                  "model.lambda_refine": {"type": "float", "low": 0.1, "high": 10.0, "log": True}},
    }  # fmt: skip
    config = write_study(tmp_path / "noise_test.yaml", assets, **study_file, n_trials=1)
    run_study(config, work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False)
    # the same study again, now with a pruner that stops any trial reporting an FID above 0
    write_study(config, assets, **{**study_file, "pruner": {"kind": "threshold", "upper": 0.0}}, n_trials=2)
    report = run_study(config, work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False)

    done, pruned = load(config).trials
    runs = trial_runs(report.parent_run_id).set_index("tags.demar.trial")
    assert done.state == optuna.trial.TrialState.COMPLETE and sorted(done.intermediate_values) == [2, 4]
    assert done.value == done.intermediate_values[4]  # the final FID, reported at the last step
    assert runs.loc["0", "status"] == "FINISHED" and runs.loc["0", "metrics.train_loss"] > 0
    assert runs.loc["0", "metrics.intermediate/fid"] == pytest.approx(done.intermediate_values[2])
    assert runs.loc["0", "params.model.noise_injection.max_step"] == str(done.params["model.noise_injection.max_step"])

    assert pruned.state == optuna.trial.TrialState.PRUNED and list(pruned.intermediate_values) == [2]
    assert runs.loc["1", "status"] == "KILLED" and runs.loc["1", "tags.demar.trial_state"] == "PRUNED"
    assert report.counts == {"COMPLETE": 1, "PRUNED": 1}
    assert "intermediate_values.png" in {p.name for p in report.files}


@pytest.mark.slow
@pytest.mark.reliability
def test_a_killed_worker_s_trial_is_retried_and_nothing_is_left_running(tmp_path, assets, session_mlflow):
    # the default heartbeat (60 s) keeps the other worker from failing the trial first
    config = write_study(tmp_path / "cfg_test.yaml", assets, n_trials=4)
    paths = ["--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--no-progress"]
    cmd = [sys.executable, "-m", "demar.studies", "run", "cfg_test", "--config", str(config), "--workers", "2", *paths]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, deadline = None, time.monotonic() + 600
    while victim is None and time.monotonic() < deadline:  # a worker in the middle of a trial
        assert proc.poll() is None, proc.stdout.read()
        try:
            running = load(config).get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 - the study is not created yet
            running = []
        for t in running:
            if TRIAL_RUN_ATTR in t.user_attrs:  # its MLflow run is open
                victim = t
                break
        time.sleep(0.1)
    assert victim is not None, "no trial started"
    worker = victim.user_attrs["worker"]
    os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "worker process(es) failed" in out
    # What a kill leaves behind: the killed worker's trial RUNNING (the one seen above, or its
    # next one if the seen trial finished before the signal landed).
    left = [t for t in load(config).trials if t.state == optuna.trial.TrialState.RUNNING]
    assert [t.user_attrs.get("worker") for t in left] == [worker], left
    victim = left[0]

    run_study(config, work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False)
    study = load(config)
    states = Counter(t.state.name for t in study.trials)
    assert states == {"COMPLETE": 4, "FAIL": 1}  # n_trials complete, the killed one failed
    assert study.trials[victim.number].state == optuna.trial.TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == victim.params  # the same point of the space, tried again

    runs = trial_runs(study.user_attrs[PARENT_RUN_ATTR]).set_index("run_id")
    assert "RUNNING" not in set(runs["status"])
    if TRIAL_RUN_ATTR in victim.user_attrs:  # killed after its MLflow run was opened
        assert runs.loc[victim.user_attrs[TRIAL_RUN_ATTR], "status"] == "FAILED"
    assert set(runs.loc[runs["status"] == "FINISHED", "tags.demar.trial"].astype(int)) == {
        t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
    }


@pytest.mark.slow
@pytest.mark.reliability
def test_a_code_or_config_change_starts_a_new_study(tmp_path, assets, session_mlflow, capsys):
    config = write_study(tmp_path / "cfg_test.yaml", assets, n_trials=1)
    paths = {"work_dir": tmp_path / "work", "out_dir": tmp_path / "out", "progress": False}
    run_study(config, **paths)
    first = load(config)
    # a behaviour change: the budget (images per score) differs, so earlier trials would not compare
    write_study(config, assets, n_trials=1, budget={"images": 20})
    report = run_study(config, **paths)
    assert "the code or config changed since" in capsys.readouterr().out
    second = load(config)
    assert second.study_name != first.study_name and second.study_name.startswith("cfg_test@")
    assert len(second.trials) == 1 and report.counts == {"COMPLETE": 1}
    assert second.user_attrs["identity"]["code"] == first.user_attrs["identity"]["code"]
    assert second.user_attrs["identity"]["config"] != first.user_attrs["identity"]["config"]


@pytest.mark.reliability
def test_dead_workers_trials_are_failed_and_queued_again_live_ones_are_kept(tmp_path):
    from demar.studies.storage import counted, fail_dead_trials, retry_dead_trial, worker_attrs

    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url, heartbeat_s=3, on_dead=retry_dead_trial)
    study = optuna.create_study(study_name="s@x", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # one complete trial
    alive, here_dead, elsewhere = study.ask(), study.ask(), study.ask()
    for t in (alive, here_dead, elsewhere):
        t.suggest_float("x", 0, 1)
    for key, value in worker_attrs().items():
        alive.set_user_attr(key, value)  # this process: alive
    here_dead.set_user_attr("worker", f"{socket.gethostname()}:{2**22 + 1}")  # no such pid
    elsewhere.set_user_attr("worker", "another-host:1")  # only its heartbeat can tell
    storage.record_heartbeat(alive._trial_id)
    storage.record_heartbeat(elsewhere._trial_id)
    assert counted(study) == 4

    assert fail_dead_trials(study, retry_dead_trial) == [here_dead.number]  # at once, by its pid
    time.sleep(8)  # the other host's trial misses its heartbeats for the grace period (6 s; sqlite's clock has 1 s steps)
    storage.record_heartbeat(alive._trial_id)
    assert fail_dead_trials(study, retry_dead_trial) == [elsewhere.number]

    trials = study.get_trials()
    state = {t.number: t.state.name for t in trials}
    assert state[alive.number] == "RUNNING"
    assert state[here_dead.number] == state[elsewhere.number] == "FAIL"
    queued = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == [here_dead.number, elsewhere.number]
    assert all("worker" not in t.user_attrs for t in queued)  # a copy never looks dead itself
    assert {t.params["x"] for t in queued} == {here_dead.params["x"], elsewhere.params["x"]}
    assert counted(study) == 2  # the failed ones are replaced by their queued copies, which count once taken


def test_opening_a_storage_whose_tables_another_process_is_creating_retries(tmp_path, monkeypatch):
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    class Racing(real):  # the first opening meets another process creating the tables
        def __init__(self, url, *args, **kwargs):
            calls.append(url)
            super().__init__(url, *args, **kwargs)
            if len(calls) == 1:
                raise sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception("table version_info already exists"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    storage = open_storage(url)
    assert len(calls) == 2 and optuna.create_study(study_name="s", storage=storage).study_name == "s"

    class Broken(real):
        def __init__(self, url, *args, **kwargs):
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", Broken)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="disk I/O error"):
        open_storage(url)
