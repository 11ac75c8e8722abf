"""The training engine: config, schedule, weight decay, data order, resume, NaN, MLflow, the stage."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from demar.config import ConfigError, validate
from demar.diffusion_head import DiffusionHead
from demar.io import atomic_write_bytes, write_json
from demar.latents import LatentDataset
from demar.model import DeMAR, ModelConfig, load_model
from demar.tokenizer import Tokenizer, TokenizerConfig
from demar.batching import StepBatchSampler
from demar.rng import derive_seed
from demar.params import RowConfig, row_model_config
from demar.train import NonFiniteLossError, param_groups, read_metrics, train
from demar.train_config import TrainConfig, lr_at, steps_for

REPO = Path(__file__).resolve().parents[1]

# A tiny model on 4x4 latents of 4 channels (N = 16 tokens of d = 4), 4 classes:
# small enough that a training step takes a fraction of a second on one core.
TINY_KNOBS = {"token_dim": 4, "seq_len": 16, "num_classes": 4, "buffer_size": 8}


def tiny_model_cfg(ablation: str = "demar") -> ModelConfig:
    return row_model_config(RowConfig(ablation=ablation, size="tiny", seed=0), TINY_KNOBS)


def tiny_train_cfg(**overrides) -> TrainConfig:
    base = {
        "batch_size": 8,
        "micro_batches": 2,
        "base_lr": 4e-3,
        "epochs": 2.0,  # 32 images / batch 8 = 4 steps per epoch
        "warmup_epochs": 0.5,
        "ema_rate": 0.9,
        "checkpoint_every": 2,
        "log_every": 1,
        "num_workers": 0,
        "seed": 3,
    }
    return TrainConfig(**{**base, **overrides})


def write_latents(
    root: Path, n: int = 32, channels: int = 4, side: int = 4, classes: int = 4, nan_index: int | None = None
) -> Path:
    """A latent cache in :mod:`demar.latents`' documented layout (one shard plus its manifest).

    The posterior mean of image ``i`` is a class-dependent pattern plus noise, so the
    class carries information the model can learn; ``nan_index`` poisons one image.
    """
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    pattern = torch.randn(classes, channels, side, side, generator=g)
    mean = pattern[labels] + 0.1 * torch.randn(n, channels, side, side, generator=g)  # [n, C, h, w]
    mean = torch.stack([mean, mean.flip(-1)], dim=1)  # [n, 2, C, h, w]: image, mirror image
    logvar = torch.full_like(mean, -6.0)
    moments = torch.cat([mean, logvar], dim=2)  # [n, 2, 2C, h, w]
    if nan_index is not None:
        moments[nan_index] = float("nan")
    buf = io.BytesIO()
    torch.save({"moments": moments, "labels": labels, "indices": torch.arange(n)}, buf)
    data = buf.getvalue()
    atomic_write_bytes(root / "shard_00000.pt", data)
    write_json(
        root / "manifest.json",
        {
            "format": "demar-latents",
            "version": 1,
            "num_items": n,
            "shard_size": n,
            "num_shards": 1,
            "moments_shape": [2, 2 * channels, side, side],
            "dtype": "float32",
            "scale": 1.0,
            "tokenizer_sha256": "test",
            "num_classes": classes,
            "source": {},
            "complete": True,
            "shards": [
                {
                    "index": 0,
                    "file": "shard_00000.pt",
                    "start": 0,
                    "count": n,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            ],
        },
    )
    return root


@pytest.fixture
def latents(tmp_path) -> Path:
    return write_latents(tmp_path / "latents")


def weights(path: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    return load_model(path, use_ema=use_ema).state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), f"{k} differs"


# ---------------------------------------------------------------------- config and pure helpers


def test_config_defaults_are_mars_recipe():
    cfg = TrainConfig()
    assert cfg.batch_size == 2048 and cfg.lr == pytest.approx(8e-4)
    assert (cfg.weight_decay, cfg.betas, cfg.grad_clip, cfg.ema_rate) == (0.02, (0.9, 0.95), 3.0, 0.9999)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr_schedule) == (400, 100, "constant")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"base_lr": -1e-4}, "train.base_lr"),
        ({"learning_rate": 1e-4}, "train.learning_rate: unknown key"),
        ({"betas": [0.9, 1.5]}, "betas[1]"),
        ({"batch_size": 10, "micro_batches": 4}, "micro_batches"),
        ({"epochs": 1, "warmup_epochs": 2}, "warmup_epochs"),
        ({"lr_schedule": "linear"}, "train.lr_schedule"),
        ({"device": "tpu"}, "train.device"),
    ],
)
def test_invalid_config_names_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(TrainConfig, data, source="params.yaml", prefix="train")


def test_lr_schedule_warmup_constant_and_cosine():
    cfg = TrainConfig(batch_size=512, base_lr=1e-4, epochs=10, warmup_epochs=2)
    total, warm = steps_for(cfg, num_images=5120)  # 10 steps per epoch
    assert (total, warm) == (100, 20.0)
    assert lr_at(0, cfg, total, warm) == 0.0
    assert lr_at(10, cfg, total, warm) == pytest.approx(1e-4)  # half-way through warm-up: lr = 2e-4 / 2
    assert lr_at(20, cfg, total, warm) == lr_at(99, cfg, total, warm) == pytest.approx(2e-4)
    cos = cfg.model_copy(update={"lr_schedule": "cosine", "min_lr": 1e-5})
    assert lr_at(20, cos, total, warm) == pytest.approx(2e-4)
    assert lr_at(60, cos, total, warm) == pytest.approx((2e-4 + 1e-5) / 2)
    assert lr_at(100, cos, total, warm) == pytest.approx(1e-5)


def test_weight_decay_follows_mar_rule():
    model = DeMAR(tiny_model_cfg("demar"))
    no_decay, decay = param_groups(model, 0.02)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.02)
    decayed = {id(p) for p in decay["params"]}
    head = {id(p) for m in model.modules() if isinstance(m, DiffusionHead) for p in m.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed and not decayed & head, "the diffusion head is never decayed"
    for p in decay["params"]:
        assert p.ndim >= 2 and not names[id(p)].endswith(".bias")
    assert "backbone.encoder_blocks.0.attn.qkv.weight" in {names[i] for i in decayed}
    assert any(names[i].startswith("denoising_head.") for i in decayed)
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_step_batches_cover_each_epoch_and_split_over_processes():
    one = StepBatchSampler(10, batch_size=4, micro_batches=2, rank=0, world_size=1, seed=1, total_steps=5)
    stream = [i for batch in one for i in batch]
    assert len(stream) == 20
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:], "a fresh permutation per epoch"
    ranks = [
        list(StepBatchSampler(10, batch_size=4, micro_batches=2, rank=r, world_size=2, seed=1, total_steps=5))
        for r in (0, 1)
    ]
    single = list(one)
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]
    resumed = list(StepBatchSampler(10, batch_size=4, micro_batches=2, rank=0, world_size=1, seed=1, total_steps=5,
                                    start_step=3))  # fmt: skip
    assert resumed == single[6:]
    assert derive_seed(1, "x", 2) == derive_seed(1, "x", 2) != derive_seed(1, "x", 3)


def test_row_config_and_model_mapping():
    cfg = tiny_model_cfg("de_head")
    assert (cfg.diffusion_head, cfg.denoising_head, cfg.seq_len) == ("mlp", True, 16)
    with pytest.raises(ConfigError, match="rows.x.ablation"):
        validate(RowConfig, {"ablation": "mar2", "size": "tiny", "seed": 0}, prefix="rows.x")
    with pytest.raises(ConfigError, match="rows.x.size"):
        validate(RowConfig, {"ablation": "mar", "size": "XL", "seed": 0}, prefix="rows.x")
    with pytest.raises(ConfigError, match="model.diffusion_head"):
        row_model_config(RowConfig(ablation="mar", size="tiny", seed=0), {"diffusion_head": "mlp"})


# ---------------------------------------------------------------------- the engine


@pytest.mark.reliability
def test_train_learns_writes_outputs_and_resumes_after_interruption(latents, tmp_path):
    """A run interrupted by a raising callback ends cleanly and resumes to the same weights."""
    model_cfg, cfg = tiny_model_cfg("demar"), tiny_train_cfg()
    full = train(model_cfg, cfg, latents_dir=latents, out_dir=tmp_path / "full", progress=False)
    assert full.metrics["steps"] == 8 and len(full.history) == 8
    rec = full.history[-1]
    for key in ("loss", "loss_diffusion", "loss_refinement", "loss_assessment", "lr", "grad_norm",
                "tokens_per_s", "steps_per_s"):  # fmt: skip
        assert math.isfinite(rec[key]), key
    assert rec["loss"] == pytest.approx(rec["loss_diffusion"] + rec["loss_refinement"] + rec["loss_assessment"])
    assert full.history[0]["lr"] == 0.0 and full.history[-1]["lr"] == pytest.approx(cfg.lr)
    assert read_metrics(full.metrics_path) == full.history
    assert full.metrics["params_total"] == DeMAR(model_cfg).param_counts()["total"]
    loaded = load_model(full.model_path)  # EMA weights, config carried by the file
    assert loaded.cfg == model_cfg

    class Stop(Exception):
        pass

    def stop_at_5(step, model, ema_model):
        assert isinstance(ema_model, DeMAR) and not ema_model.training
        if step == 5:
            raise Stop

    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        train(model_cfg, cfg, latents_dir=latents, out_dir=out, callback=stop_at_5, progress=False)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4, "the last checkpoint before the interruption stays as it was"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    resumed = train(model_cfg, cfg, latents_dir=latents, out_dir=out, progress=False)
    assert resumed.resumed_from == 4
    assert [r["step"] for r in resumed.history] == list(range(1, 9))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert_same_weights(weights(resumed.model_path), weights(full.model_path))
    assert_same_weights(weights(resumed.model_path, use_ema=True), weights(full.model_path, use_ema=True))


@pytest.mark.reliability
def test_changed_config_starts_fresh_instead_of_resuming(latents, tmp_path, capsys):
    model_cfg = tiny_model_cfg("mar")
    train(model_cfg, tiny_train_cfg(epochs=0.5), latents_dir=latents, out_dir=tmp_path / "o", progress=False)
    capsys.readouterr()
    again = train(model_cfg, tiny_train_cfg(epochs=0.5, base_lr=1e-3), latents_dir=latents,
                  out_dir=tmp_path / "o", progress=False)  # fmt: skip
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "train.base_lr" in said[0] and "starting a fresh run" in said[0]
    assert again.resumed_from == 0


def test_loader_workers_and_grad_checkpointing_leave_results_unchanged(latents, tmp_path):
    model_cfg = tiny_model_cfg("mar")
    plain = train(model_cfg, tiny_train_cfg(epochs=0.5), latents_dir=latents, out_dir=tmp_path / "a",
                  progress=False)  # fmt: skip
    other = train(model_cfg, tiny_train_cfg(epochs=0.5, num_workers=1, grad_checkpointing=True),
                  latents_dir=latents, out_dir=tmp_path / "b", progress=False)  # fmt: skip
    assert [r["loss"] for r in other.history] == [r["loss"] for r in plain.history]
    assert_same_weights(weights(other.model_path), weights(plain.model_path))


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_train_cfg()
    # Poison one image of step 3 (0-based): steps 0-2 are clean, the checkpoint of step 2 is written.
    sampler = StepBatchSampler(32, cfg.batch_size, cfg.micro_batches, 0, 1, cfg.seed, total_steps=8)
    bad = sampler.indices(3, 1)[0]
    assert all(bad not in sampler.indices(s, m) for s in range(3) for m in range(2))
    latents = write_latents(tmp_path / "latents", nan_index=bad)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(loss=nan, loss_diffusion=nan") as err:
        train(tiny_model_cfg("mar"), cfg, latents_dir=latents, out_dir=out, progress=False)
    assert err.value.step == 3 and math.isnan(err.value.components["loss"])
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2
    model = DeMAR(tiny_model_cfg("mar"))
    model.load_state_dict(ckpt["model"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "model.pt").exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from demar.model import ModelConfig
    from demar.train import train
    from demar.train_config import TrainConfig
    latents, out, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
    here = Path(__file__).parent
    model_cfg = ModelConfig.model_validate_json((here / "model.json").read_text())
    train_cfg = TrainConfig.model_validate_json((here / "train.json").read_text())
    def pace(step, model, ema):  # give the test time to kill between checkpoints
        if slow:
            time.sleep(0.5)
    train(model_cfg, train_cfg, latents_dir=latents, out_dir=out, callback=pace, progress=False)
    """
)


@pytest.mark.reliability
@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_weights(latents, tmp_path):
    script = tmp_path / "run_train.py"
    script.write_text(KILL_SCRIPT)
    (tmp_path / "model.json").write_text(tiny_model_cfg("demar").model_dump_json())
    (tmp_path / "train.json").write_text(tiny_train_cfg(epochs=3.0, device="cpu").model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(latents), str(killed), "slow"], env=env, cwd=REPO)
    ckpt_file = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt_file.is_file() and torch.load(ckpt_file, weights_only=True)["step"] >= 4:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    step_killed = torch.load(ckpt_file, weights_only=True)["step"]
    assert 4 <= step_killed < 12 and not (killed / "model.pt").exists()
    for out, mode in ((killed, "fast"), (tmp_path / "straight", "fast")):
        subprocess.run([sys.executable, str(script), str(latents), str(out), mode], env=env, cwd=REPO, check=True)
    assert_same_weights(weights(killed / "model.pt"), weights(tmp_path / "straight" / "model.pt"))
    assert_same_weights(weights(killed / "model.pt", True), weights(tmp_path / "straight" / "model.pt", True))
    a, b = (torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (killed, tmp_path / "straight"))
    assert a["step"] == b["step"] == 12
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


# ---------------------------------------------------------------------- the DVC stage


def stage_params(tmp_path: Path, **train_overrides) -> Path:
    params = {
        "preset": "testing",
        "model": dict(TINY_KNOBS),
        "rows": {"tiny_demar": {"ablation": "demar", "size": "tiny", "seed": 5}},
        "train": {
            "batch_size": 8,
            "micro_batches": 1,
            "base_lr": 4e-3,
            "epochs": 0.75,
            "warmup_epochs": 0.25,
            "ema_rate": 0.9,
            "checkpoint_every": 10,
            "log_every": 1,
            "num_workers": 0,
            **train_overrides,
        },
        "tracking": {"enabled": True, "system_metrics": False},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(tmp_path: Path, *extra: str) -> int:
    from pipelines.train import main

    return main(
        ["--row", "tiny_demar", "--params", str(tmp_path / "params.yaml"), "--latents", str(tmp_path / "latents"),
         "--tokenizer", str(tmp_path / "tokenizer.pt"), "--models", str(tmp_path / "models"),
         "--metrics", str(tmp_path / "metrics" / "train"), "--no-progress", *extra]
    )  # fmt: skip


def test_stage_logs_params_metrics_and_tags_to_mlflow(tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    write_latents(tmp_path / "latents")
    stage_params(tmp_path)
    # A tiny tokenizer (16x16 images <-> 4x4x4 latents) so that the stage logs sample grids.
    tok_cfg = TokenizerConfig(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, decoder_res_blocks=1,
                              attn_resolutions=(), z_channels=4, embed_dim=4, norm_groups=4)  # fmt: skip
    Tokenizer(tok_cfg, scale=1.0).save(tmp_path / "tokenizer.pt")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"].update(sample_every=3, sample_count=4, sample_settings={"num_iter": 4, "diffusion_steps": 5})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "params.yaml"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"],
                   check=True)  # fmt: skip
    sha = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "train@tiny_demar")
    assert run_stage(tmp_path) == 0

    df = mlflow.search_runs(experiment_names=["demar-testing"])
    assert len(df) == 1
    r = df.iloc[0]
    assert r["status"] == "FINISHED"
    assert r["params.train.base_lr"] == "0.004" and r["params.train.seed"] == "5"
    assert r["params.train.lr"] == str(4e-3 * 8 / 256)
    assert r["params.model.diffusion_head"] == "transformer" and r["params.model.denoising_head"] == "True"
    assert r["params.row.ablation"] == "demar" and r["params.model.seq_len"] == "16"
    assert (r["tags.demar.git_commit"], r["tags.demar.git_dirty"]) == (sha, "false")
    assert r["tags.demar.stage"] == "train@tiny_demar"
    assert (r["tags.demar.row"], r["tags.demar.seed"]) == ("tiny_demar", "5")
    client = mlflow.MlflowClient()
    for key in ("loss", "loss_diffusion", "loss_refinement", "loss_assessment", "lr", "grad_norm", "tokens_per_s",
                "steps_per_s"):  # fmt: skip
        history = client.get_metric_history(r["run_id"], key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3], key

    record = json.loads((tmp_path / "metrics" / "train" / "tiny_demar.json").read_text())
    assert set(record) == {
        "row", "ablation", "size", "seed", "steps", "loss", "loss_diffusion", "loss_refinement", "loss_assessment",
        "params_total", "params_by_component", "tokens_per_s", "steps_per_s", "wall_s",
    }  # fmt: skip
    assert (record["row"], record["ablation"], record["size"], record["seed"], record["steps"]) == (
        "tiny_demar", "demar", "tiny", 5, 3)  # fmt: skip
    assert (tmp_path / "models" / "tiny_demar" / "model.pt").is_file()
    assert r["metrics.final/loss"] == pytest.approx(record["loss"])
    images = [a.path for a in client.list_artifacts(r["run_id"], "images")]
    assert images == ["images/samples_00000003.png"]
    assert "metrics.jsonl" in [a.path for a in client.list_artifacts(r["run_id"])]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["train"].update(base_lr=-1e-3), "train.base_lr"),
        (lambda p: p["train"].update(lr=1e-3), "train.lr: unknown key"),
        (lambda p: p["rows"]["tiny_demar"].update(dropout=0.1), "rows.tiny_demar.dropout: unknown key"),
        (lambda p: p["model"].update(widht=8), "widht"),
        (lambda p: p["tracking"].update(enabled="sometimes"), "tracking.enabled"),
        (lambda p: p["train"].update(seed=1), "train.seed"),
        (lambda p: p["rows"].update(other=p["rows"].pop("tiny_demar")), "rows.tiny_demar: unknown row"),
    ],
)
def test_stage_rejects_invalid_params_before_any_work(tmp_path, monkeypatch, edit, message):
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    stage_params(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run_stage(tmp_path)  # no latents at all: validation must fail first
    assert not (tmp_path / "models").exists()
    assert not store.exists(), "no tracking before validation"


def test_stage_with_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch):
    from demar.tracking import TrackingError

    write_latents(tmp_path / "latents")
    stage_params(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="unreachable"):
        run_stage(tmp_path)
    assert not (tmp_path / "models").exists()


def test_latent_fixture_matches_the_latents_module(latents):
    ds = LatentDataset(latents)
    moments, label = ds[5]
    assert moments.shape == (2, 8, 4, 4) and label == 1 and ds.num_classes == 4 and len(ds) == 32
