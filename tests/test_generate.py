"""Sampling images to disk (demar.generate) and the sample / time_fid stages.

Everything runs the real tiny model (untrained) and a real tokenizer bundle with
random weights at 32x32 (8x8 latents of 4 channels: N = 64 tokens of d = 4).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from demar.generate import GenerateConfig, GenerateMismatchError, SampleStageConfig, class_labels, generate
from demar.images import GeneratedImages
from demar.model import DeMAR, ModelConfig, load_model, save_checkpoint
from demar.sampler import SampleSettings
from demar.time_fid import TimeFidConfig, sweep_steps
from demar.tokenizer import Tokenizer, TokenizerConfig

NUM_CLASSES = 4
SETTINGS = {"num_iter": 3, "diffusion_steps": 4, "cfg": 2.0, "temperature": 1.0}
REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> DeMAR:
    """The tiny De-MAR, its weights jittered as a stand-in for training: freshly initialised, the
    zero-initialised output layers would make every head's prediction the same."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_size(
        "tiny", token_dim=4, seq_len=64, num_classes=NUM_CLASSES, diffusion_head="transformer", denoising_head=True
    )
    model = DeMAR(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tiny_tokenizer(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = TokenizerConfig(
        resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, decoder_res_blocks=1, attn_resolutions=(),
        z_channels=4, embed_dim=4, norm_groups=4,
    )  # fmt: skip
    return Tokenizer(cfg, scale=0.5).eval()


def gen_cfg(**overrides) -> GenerateConfig:
    data = {"num_images": 12, "batch_size": 4, "seed": 3, "sampler": SETTINGS, "grid_size": 3}
    data.update(overrides)
    return GenerateConfig.model_validate(data)


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny model and tokenizer, also saved as files (the stages and subprocesses load them)."""
    root = tmp_path_factory.mktemp("weights")
    model, tok = tiny_model(), tiny_tokenizer()
    save_checkpoint(root / "model.pt", model)
    tok.save(root / "tokenizer.pt")
    return root


@pytest.fixture(scope="module")
def reference_run(weights, tmp_path_factory):
    """An uninterrupted run: 12 images, 3 batches of 4."""
    out = tmp_path_factory.mktemp("reference")
    model = load_model(weights / "model.pt")
    tok = Tokenizer.load(weights / "tokenizer.pt")
    result = generate(model, tok, gen_cfg(), out, num_classes=NUM_CLASSES, progress=False)
    return out, result


def test_labels_are_class_balanced_in_a_fixed_order():
    labels = class_labels(12, 4)
    assert labels.tolist() == [0, 1, 2, 3] * 3
    assert set(Counter(labels.tolist()).values()) == {3}
    with pytest.raises(ValueError, match="multiple"):
        class_labels(10, 4)


def test_manifest_lists_every_file_with_its_label(reference_run):
    out, result = reference_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert [e["file"] for e in manifest["images"]] == [f"{i:05d}.png" for i in range(12)]
    assert [e["label"] for e in manifest["images"]] == [i % NUM_CLASSES for i in range(12)]
    assert set(Counter(result.labels).values()) == {12 // NUM_CLASSES}
    on_disk = {p.name for p in out.iterdir()}
    assert on_disk == {e["file"] for e in manifest["images"]} | {"manifest.json", "grid.png", "timing.json"}
    assert manifest["settings"] == SampleSettings(**SETTINGS).model_dump(mode="json")
    assert manifest["seed"] == 3 and manifest["num_classes"] == NUM_CLASSES
    assert len(manifest["model"]["weights_sha256"]) == 64 and len(manifest["tokenizer"]["weights_sha256"]) == 64
    images = GeneratedImages(out)
    image, label = images[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 1
    with Image.open(out / "00005.png") as im:
        assert np.array_equal(np.asarray(im), image.permute(1, 2, 0).numpy())


def test_grid_has_one_column_per_class(reference_run):
    out, _ = reference_run
    with Image.open(out / "grid.png") as grid:
        # grid_size 3 of 4 classes: 3 columns, 3 images per class: 3 rows, 2-pixel padding.
        assert grid.size == (3 * 34 + 2, 3 * 34 + 2)
        canvas = np.asarray(grid)
    first = np.asarray(Image.open(out / "00000.png"))
    assert np.array_equal(canvas[2:34, 2:34], first)


def test_timing_excludes_the_warmup_batch(reference_run):
    out, result = reference_run
    timing = json.loads((out / "timing.json").read_text())
    assert timing == result.timing
    assert timing["warmup_batches"] == 1 and timing["measured_batches"] == 2
    assert timing["measured_images"] == 8 and timing["skipped_batches"] == 0
    assert timing["sec_per_image"] > 0 and timing["images_per_s"] == pytest.approx(1 / timing["sec_per_image"])
    assert timing["batch_size"] == 4 and timing["device"] == "cpu" and timing["autocast"] == "none"
    manifest = json.loads((out / "manifest.json").read_text())
    timed = [b for b in manifest["batches"] if not b["warmup"]]
    assert [b["batch"] for b in timed] == [1, 2]
    per_image = sum(b["sample_s"] + b["decode_s"] for b in timed) / 8
    assert timing["sec_per_image"] == pytest.approx(per_image)


def test_same_seed_gives_identical_images_and_another_seed_does_not(weights, reference_run, tmp_path):
    out, _ = reference_run
    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    generate(model, tok, gen_cfg(num_images=8), tmp_path / "same", num_classes=NUM_CLASSES, progress=False)
    generate(model, tok, gen_cfg(num_images=8, seed=4), tmp_path / "other", num_classes=NUM_CLASSES, progress=False)
    ref = png_bytes(out)
    same, other = png_bytes(tmp_path / "same"), png_bytes(tmp_path / "other")
    # Batches depend on (seed, batch index) only: the first two batches agree with the 12-image run.
    assert same == {k: ref[k] for k in same}
    assert all(other[k] != ref[k] for k in other)


@pytest.mark.reliability
def test_resume_after_a_stop_writes_the_same_images(weights, reference_run, tmp_path):
    out, _ = reference_run
    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    run_dir = tmp_path / "resumed"
    first = generate(model, tok, gen_cfg(), run_dir, num_classes=NUM_CLASSES, progress=False, stop_after=1)
    assert first.computed_batches == 1 and not (run_dir / "timing.json").exists()
    assert not json.loads((run_dir / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match="unfinished"):
        GeneratedImages(run_dir)
    # What a kill in the middle of batch 1 leaves: one image of it written, a temporary file.
    (run_dir / "00004.png").write_bytes(b"half a batch")
    (run_dir / ".00005.png.abc.tmp").write_bytes(b"partial")

    second = generate(model, tok, gen_cfg(), run_dir, num_classes=NUM_CLASSES, progress=False)
    assert (second.skipped_batches, second.computed_batches) == (1, 2)
    assert png_bytes(run_dir) == png_bytes(out)
    manifest, ref_manifest = (json.loads((d / "manifest.json").read_text()) for d in (run_dir, out))
    assert manifest["images"] == ref_manifest["images"]
    assert (run_dir / "grid.png").read_bytes() == (out / "grid.png").read_bytes()
    assert not (run_dir / ".00005.png.abc.tmp").exists()
    # Timed: batch 2 only (batch 0 warmed up the first process, batch 1 the second).
    assert second.timing["measured_batches"] == 1 and second.timing["warmup_batches"] == 2
    assert second.timing["skipped_batches"] == 1

    third = generate(model, tok, gen_cfg(), run_dir, num_classes=NUM_CLASSES, progress=False)
    assert (third.skipped_batches, third.computed_batches) == (3, 0)


@pytest.mark.reliability
@pytest.mark.slow
def test_resume_after_sigkill_writes_the_same_images(weights, tmp_path):
    """A separate process is killed (SIGKILL) once its first batch is recorded; a resumed run
    writes the same bytes as an uninterrupted one."""
    cfg = gen_cfg(num_images=16, batch_size=2)
    run_dir, ref_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    child = textwrap.dedent(f"""
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from demar.generate import GenerateConfig, generate
        from demar.model import load_model
        from demar.tokenizer import Tokenizer
        cfg = GenerateConfig.model_validate_json({cfg.model_dump_json()!r})
        model, tok = load_model({str(weights / "model.pt")!r}), Tokenizer.load({str(weights / "tokenizer.pt")!r})
        generate(model, tok, cfg, {str(run_dir)!r}, num_classes={NUM_CLASSES}, progress=False)
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=env)
    manifest = run_dir / "manifest.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.is_file() and json.loads(manifest.read_text())["batches"]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the child ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 1 <= len(state["batches"]) < cfg.num_batches

    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    resumed = generate(model, tok, cfg, run_dir, num_classes=NUM_CLASSES, progress=False)
    generate(model, tok, cfg, ref_dir, num_classes=NUM_CLASSES, progress=False)
    assert resumed.skipped_batches >= 1
    assert png_bytes(run_dir) == png_bytes(ref_dir) and len(png_bytes(ref_dir)) == 16
    assert not list(run_dir.glob(".*.tmp"))  # temporary files of a write the kill interrupted are gone


def test_other_settings_in_the_folder_are_an_error_or_a_restart(weights, tmp_path):
    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    generate(model, tok, gen_cfg(num_images=4), tmp_path, num_classes=NUM_CLASSES, progress=False)
    with pytest.raises(GenerateMismatchError, match="seed"):
        generate(model, tok, gen_cfg(num_images=4, seed=9), tmp_path, num_classes=NUM_CLASSES, progress=False)
    result = generate(
        model,
        tok,
        gen_cfg(num_images=4, seed=9),
        tmp_path,
        num_classes=NUM_CLASSES,
        progress=False,
        on_mismatch="restart",
    )
    assert result.skipped_batches == 0 and result.computed_batches == 1
    # A single batch: run once as a discarded warm-up, then timed.
    assert result.timing["measured_batches"] == 1 and result.timing["warmup_batches"] == 0


def test_a_code_change_resamples_every_batch_and_says_so(weights, tmp_path, monkeypatch, capsys):
    import demar.generate

    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    cfg = gen_cfg(num_images=8)
    generate(model, tok, cfg, tmp_path, num_classes=NUM_CLASSES, progress=False, stop_after=1)
    # Unchanged code: the rerun resumes, recomputing only the unfinished batch.
    resumed = generate(model, tok, cfg, tmp_path, num_classes=NUM_CLASSES, progress=False)
    assert (resumed.skipped_batches, resumed.computed_batches) == (1, 1)
    before = png_bytes(tmp_path)

    # A behaviour-changing edit of a module that draws the images changes the code digest.
    real = demar.generate.code_digest
    monkeypatch.setattr(demar.generate, "code_digest", lambda *modules: "edited-" + real(*modules))
    with pytest.raises(GenerateMismatchError, match="code"):
        generate(model, tok, cfg, tmp_path, num_classes=NUM_CLASSES, progress=False)
    capsys.readouterr()
    # Never mixed: the old images are gone before any new one is drawn.
    generate(model, tok, cfg, tmp_path, num_classes=NUM_CLASSES, progress=False, on_mismatch="restart", stop_after=0)
    assert png_bytes(tmp_path) == {}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "code" in err[0] and "afresh" in err[0] and str(tmp_path) in err[0]
    redone = generate(model, tok, cfg, tmp_path, num_classes=NUM_CLASSES, progress=False, on_mismatch="restart")
    assert (redone.skipped_batches, redone.computed_batches) == (0, 2)
    assert png_bytes(tmp_path) == before  # the simulated edit changes no behaviour, so the same bytes
    assert json.loads((tmp_path / "manifest.json").read_text())["key"]["code"].startswith("edited-")


def test_the_image_identity_covers_the_code_that_draws_and_decodes():
    from demar.generate import IMAGE_CODE
    from demar.identity import project_modules

    modules = set(project_modules(*IMAGE_CODE))
    assert {
        "demar.sampler", "demar.backbone", "demar.model", "demar.mlp_head", "demar.transformer_head",
        "demar.denoising_head", "demar.diffusion", "demar.tokenizer", "demar.images", "demar.rng",
    } <= modules  # fmt: skip


@pytest.mark.reliability
def test_model_files_are_checked_against_the_row(weights, tmp_path):
    from pipelines.sample import ModelFileError, load_row_model

    expected = load_model(weights / "model.pt").cfg
    model = load_row_model(weights / "model.pt", expected, "r0", use_ema=True, device=torch.device("cpu"))
    assert model.cfg == expected

    def refused(path: Path, match: str) -> str:
        with pytest.raises(ModelFileError, match=match) as err:
            load_row_model(path, expected, "r0", use_ema=True, device=torch.device("cpu"))
        assert str(path) in str(err.value)
        return str(err.value)

    refused(tmp_path / "absent.pt", "not found")
    (tmp_path / "text.pt").write_bytes(b"model weights, honestly\n" * 10)
    refused(tmp_path / "text.pt", "")
    data = (weights / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "truncated.pt", "")
    other = DeMAR(expected.model_copy(update={"diffusion_head": "mlp", "denoising_head": False}))
    save_checkpoint(tmp_path / "other.pt", other)
    message = refused(tmp_path / "other.pt", "rows.r0")
    assert "diffusion_head" in message and "denoising_head" in message and "transformer" in message


def test_shards_hold_the_same_pixels_as_pngs(weights, reference_run, tmp_path):
    out, _ = reference_run
    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    generate(model, tok, gen_cfg(image_format="shards"), tmp_path, num_classes=NUM_CLASSES, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard_*.npy")) == [f"shard_{b:05d}.npy" for b in range(3)]
    shards, pngs = GeneratedImages(tmp_path), GeneratedImages(out)
    assert len(shards) == len(pngs) == 12
    for i in range(12):
        (a, la), (b, lb) = shards[i], pngs[i]
        assert la == lb and torch.equal(a, b)


# ----------------------------------------------------------------------------- the stages


def write_repo(root: Path, weights: Path, **sections) -> Path:
    (root / "models" / "r0").mkdir(parents=True)
    (root / "models" / "r0" / "model.pt").write_bytes((weights / "model.pt").read_bytes())
    (root / "models" / "tokenizer.pt").write_bytes((weights / "tokenizer.pt").read_bytes())
    params = {
        "preset": "embedded",
        "model": {"token_dim": 4, "seq_len": 64, "num_classes": NUM_CLASSES},
        "rows": {"r0": {"ablation": "demar", "size": "tiny", "seed": 5, "cfg": 1.5}},
        "sample": {"num_images": 8, "batch_size": 4, "sampler": SETTINGS, "grid_size": 4, "untrained_num_images": 4},
        **sections,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_sample_stage_writes_trained_and_untrained_sets(weights, tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    from pipelines import sample

    root = write_repo(tmp_path, weights)
    monkeypatch.chdir(root)
    assert sample.main(["--row", "r0", "--no-progress"]) == 0
    assert sample.main(["--row", "r0", "--untrained", "--no-progress"]) == 0

    trained, untrained = GeneratedImages(root / "samples" / "r0"), GeneratedImages(root / "samples" / "r0_untrained")
    assert (len(trained), len(untrained)) == (8, 4)
    for d in ("r0", "r0_untrained"):
        assert {"grid.png", "timing.json", "manifest.json"} <= {p.name for p in (root / "samples" / d).iterdir()}
    m_trained = json.loads((root / "samples" / "r0" / "manifest.json").read_text())
    m_untrained = json.loads((root / "samples" / "r0_untrained" / "manifest.json").read_text())
    assert m_trained["seed"] == m_untrained["seed"] == 5
    assert m_trained["settings"] == {**SampleSettings(**SETTINGS).model_dump(mode="json"), "cfg": 1.5}
    assert m_trained["model"]["file"].endswith("model.pt") and m_untrained["model"]["file"] is None
    assert m_trained["model"]["weights_sha256"] != m_untrained["model"]["weights_sha256"]
    assert not torch.equal(trained[0][0], untrained[0][0])

    runs = mlflow.search_runs(experiment_names=["demar-embedded"])
    assert set(runs["tags.demar.work"]) == {"sample", "sample_untrained"}
    assert (runs["metrics.timing/sec_per_image"] > 0).all()
    client = mlflow.MlflowClient()
    for run_id in runs["run_id"]:
        assert [a.path for a in client.list_artifacts(run_id, "images")] == ["images/grid.png"]

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="sample.seed"):
        sample.main(["--row", "r0", "--no-progress", "--no-mlflow"])


@pytest.mark.reliability
def test_sample_stage_refuses_a_broken_model_file_in_one_line(weights, tmp_path, monkeypatch, capsys):
    root = write_repo(tmp_path, weights)
    monkeypatch.chdir(root)
    data = (root / "models" / "r0" / "model.pt").read_bytes()
    (root / "models" / "r0" / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit) as exit_:
        run_sample_stage(["--row", "r0", "--no-progress", "--no-mlflow"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models/r0/model.pt" in err[0]
    assert not (root / "samples").exists()


def run_sample_stage(argv: list[str]) -> None:
    """Run the sample stage as its ``__main__`` does (``run_stage``), in this process."""
    from pipelines import run_stage, sample

    run_stage(lambda: sample.main(argv), "sample")


def test_time_fid_stage_writes_one_point_per_step_pair(weights, tmp_path, mlflow_uri, monkeypatch):
    from demar.classifier import ClassifierConfig, ShapeClassifier, save_classifier
    from pipelines import time_fid

    ref = tmp_path / "reference"
    ref.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(ref / f"{i:03d}.png")
    torch.manual_seed(0)
    save_classifier(
        tmp_path / "classifier.pt",
        ShapeClassifier(ClassifierConfig(num_classes=NUM_CLASSES, channels=(8, 16), feature_dim=8)),
    )
    root = write_repo(
        tmp_path / "repo", weights,
        time_fid={"ar_steps": [2, 3], "diffusion_steps": [3], "num_images": 8, "batch_size": 4},
        evaluate={"weights_path": str(tmp_path / "classifier.pt"), "reference": str(ref), "metrics": ["fid"],
                  "cache_dir": str(tmp_path / "cache")},
    )  # fmt: skip
    monkeypatch.chdir(root)
    assert time_fid.main(["--row", "r0", "--no-progress"]) == 0
    out = json.loads((root / "metrics" / "time_fid" / "r0.json").read_text())
    assert (out["row"], out["family"], out["seed"]) == ("r0", "De-MAR", 5)
    assert [(p["ar_steps"], p["diffusion_steps"]) for p in out["points"]] == [(2, 3), (3, 3)]
    assert all(p["sec_per_image"] > 0 and np.isfinite(p["fid"]) for p in out["points"])
    scratch = root / "samples" / "time_fid" / "r0"
    assert sorted(p.name for p in scratch.iterdir()) == ["ar0002_diff0003.json", "ar0003_diff0003.json"]

    # A second run reuses the finished points (same settings, weights and scorer).
    before = {p.name: p.stat().st_mtime_ns for p in scratch.iterdir()}
    assert time_fid.main(["--row", "r0", "--no-progress", "--no-mlflow"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in scratch.iterdir()} == before
    assert json.loads((root / "metrics" / "time_fid" / "r0.json").read_text())["points"] == out["points"]


def test_sweep_recomputes_a_point_whose_code_changed(weights, tmp_path, monkeypatch, capsys):
    import demar.time_fid

    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    calls = []

    def score(images: GeneratedImages) -> float:
        calls.append(len(images))
        return 1.0

    sweep = TimeFidConfig(ar_steps=(2,), diffusion_steps=(2,), num_images=4)
    base = gen_cfg(num_images=4)
    kwargs = {"num_classes": NUM_CLASSES, "score": score, "progress": False}
    first = sweep_steps(model, tok, base, sweep, tmp_path, **kwargs)
    assert sweep_steps(model, tok, base, sweep, tmp_path, **kwargs) == first and calls == [4]  # reused
    real = demar.time_fid.code_digest
    monkeypatch.setattr(demar.time_fid, "code_digest", lambda *modules: "edited-" + real(*modules))
    capsys.readouterr()
    sweep_steps(model, tok, base, sweep, tmp_path, **kwargs)
    assert calls == [4, 4]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ar0002_diff0002.json" in err[0] and "code" in err[0]
    record = json.loads((tmp_path / "ar0002_diff0002.json").read_text())
    assert record["key"]["code"].startswith("edited-")


def test_sweep_scores_each_point_with_the_given_function(weights, tmp_path):
    model, tok = load_model(weights / "model.pt"), Tokenizer.load(weights / "tokenizer.pt")
    seen = []

    def score(images: GeneratedImages) -> float:
        seen.append(len(images))
        return float(sum(img.float().mean() for img, _ in images))

    sweep = TimeFidConfig(ar_steps=(2,), diffusion_steps=(2, 3), num_images=4, keep_images=True)
    base = SampleStageConfig.model_validate({"batch_size": 4, "sampler": SETTINGS}).for_run(seed=1)
    points = sweep_steps(model, tok, base, sweep, tmp_path, num_classes=NUM_CLASSES, score=score, progress=False)
    assert [(p["ar_steps"], p["diffusion_steps"]) for p in points] == [(2, 2), (2, 3)]
    assert seen == [4, 4] and points[0]["fid"] != points[1]["fid"]
    manifest = json.loads((tmp_path / "ar0002_diff0003" / "manifest.json").read_text())
    assert manifest["settings"]["num_iter"] == 2 and manifest["settings"]["diffusion_steps"] == 3
    assert manifest["settings"]["cfg"] == SETTINGS["cfg"]
