"""Optuna studies (demar.studies): configs, storage, workers, resume, failures, MLflow runs, reports.

The studies run the real library end to end on a tiny setup built once per session:
embedded shapes at 32x32, a random-weight tokenizer bundle, its latent cache written
by the real latents writer, the embedded classifier as FID's feature extractor, and
a tiny De-MAR trained for a few steps by the real ``train``.
"""

from __future__ import annotations

import os
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
from demar.studies import (
    PARENT_RUN_ATTR,
    StudyConfig,
    check_space,
    default_storage,
    load_study_config,
    main,
    make_sampler,
    open_storage,
    quotas,
    redact,
    resolve_base,
    run_study,
)
from demar.tokenizer import Tokenizer, TokenizerConfig, file_sha256
from demar.train import RowConfig, TrainConfig, row_model_config, train

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
    return optuna.load_study(study_name=cfg.name, storage=open_storage(default_storage(config, cfg.name)))


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
    ],
)
def test_invalid_study_files_are_rejected(tmp_path, assets, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_study_config(write_study(tmp_path / "s.yaml", assets, **overrides))


def test_shipped_study_files_fit_the_embedded_preset():
    noise = load_study_config(REPO / "studies" / "noise_schedule.yaml")
    cfg = load_study_config(REPO / "studies" / "cfg.yaml")
    assert noise.objective == "training" and noise.directions == ["minimize"] and noise.pruner.kind == "median"
    assert {"model.noise_injection.max_step", "model.diffusion.schedule", "model.lambda_refine"} <= set(noise.space)
    assert cfg.objective == "sampling" and list(cfg.objectives) == ["fid", "sec_per_image"]
    for study in (noise, cfg):  # every bound and choice is a valid value of the preset's configs
        study = study.model_copy(update={"base": study.base.model_copy(update={"params": str(PRESET)})})
        base = resolve_base(study, check_files=False)
        check_space(study, base, source=study.name)
        assert base.preset == "embedded"


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
    config = write_study(tmp_path / "cfg_test.yaml", assets, n_trials=4)
    report = run_study(config, workers=2, work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False)

    study = load(config)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
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
def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, assets, session_mlflow):
    config = write_study(tmp_path / "cfg_test.yaml", assets, n_trials=2, fail_trials=[0])
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
