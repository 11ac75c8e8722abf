"""FID / IS / precision-recall / KID through torch-fidelity, the reference cache and the evaluate stage."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from demar.classifier import EXTRACTOR_NAME, ClassifierConfig, save_classifier, train_classifier
from demar.data.embedded import EmbeddedConfig, generate, write_split
from demar.images import CorruptImageError, MissingFileError
from demar.image_sets import open_images, reference_identity
from demar.metrics import EvaluateConfig, ExtractorSpec, compute_metrics
from demar.reference_stats import load_reference

N_REF = 200
N_GEN = 100


def write_pngs(folder: Path, images: torch.Tensor) -> list[str]:
    """uint8 [N, 3, H, W] -> folder/00000.png, ...; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(images):
        names.append(f"{i:05d}.png")
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / names[-1])
    return names


def write_samples(folder: Path, images: torch.Tensor, labels: list[int]) -> None:
    """A samples folder as demar.generate writes it: PNGs, a manifest listing them, a grid, timing."""
    names = write_pngs(folder, images)
    manifest = {
        "format": "demar-samples",
        "version": 1,
        "num_images": len(names),
        "complete": True,
        "images": [{"file": n, "label": int(y)} for n, y in zip(names, labels, strict=True)],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    Image.new("RGB", (70, 70)).save(folder / "grid.png")
    (folder / "timing.json").write_text(json.dumps({"sec_per_image": 0.25}))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An embedded reference split on disk, generated shapes, and two classifier checkpoints."""
    root = tmp_path_factory.mktemp("metrics")
    cfg = EmbeddedConfig(num_train=1000, num_reference=N_REF)
    write_split(cfg, "reference", root / "reference", progress=False)
    train_images, train_attrs, _ = generate(cfg, "train", progress=False)
    clf_cfg = ClassifierConfig(epochs=1)
    for seed in (0, 1):  # features only need to separate shapes from noise; training quality is not tested here
        model = train_classifier(clf_cfg.model_copy(update={"seed": seed}), train_images, train_attrs.shape,
                                 progress=False)  # fmt: skip
        save_classifier(root / f"classifier{seed}.pt", model)
    gen, gen_labels = train_images[:N_GEN], train_attrs.shape[:N_GEN].tolist()
    write_samples(root / "samples", gen, gen_labels)
    return {"root": root, "reference": root / "reference", "samples": root / "samples", "gen": gen,
            "labels": gen_labels, "weights": root / "classifier0.pt", "weights_other": root / "classifier1.pt"}  # fmt: skip


def spec(data, **kw) -> ExtractorSpec:
    return ExtractorSpec(weights_path=str(data["weights"]), **kw)


def test_fid_of_the_reference_against_itself_is_zero_and_noise_is_far(data):
    ref = data["reference"]
    same = compute_metrics(ref, ref, extractor=spec(data), kid_subset_size=50, progress=False)
    noise = torch.randint(0, 256, (N_REF, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    far = compute_metrics(torch.utils.data.TensorDataset(noise), ref, extractor=spec(data), kid_subset_size=50,
                          progress=False)  # fmt: skip
    # Scale: the total variance tr(Sigma_ref) of the reference features. Tolerance for the
    # self-distance: 1e-6 of that scale (float64 statistics; observed ~1e-12 absolute).
    stats = load_reference(ref, extractor=spec(data), fid_layer="penultimate", feature_layers=[],
                           extract=_extractor(data), cache_dir=None).fid_stats  # fmt: skip
    scale = float(np.trace(stats["sigma"]))
    assert abs(same["fid"]) < 1e-6 * scale
    assert far["fid"] > 0.5 * scale
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert far["precision"] < 0.05 and far["recall"] < 0.05
    assert abs(same["kid"]) < 0.05 * far["kid"]
    assert set(same) == {"fid", "is", "is_std", "precision", "recall", "kid", "kid_std"}
    assert all(math.isfinite(v) for v in (*same.values(), *far.values()))


def test_same_numbers_as_torch_fidelity_calculate_metrics(data, tmp_path):
    ref_folder = tmp_path / "ref_png"
    write_pngs(ref_folder, torch.from_numpy(np.load(data["reference"] / "images.npy")))
    options = {"isc_splits": 5, "kid_subsets": 20, "kid_subset_size": 50, "prc_neighborhood": 3, "rng_seed": 7}
    ours = compute_metrics(data["samples"], ref_folder, extractor=spec(data), batch_size=32, progress=False, **options)
    # torch-fidelity globs the folder (grid.png included); ours reads the manifest's images.
    # Compare on the same images: a copy without grid.png.
    assert len(open_images(data["samples"])) == N_GEN
    copy = tmp_path / "samples_only"
    shutil.copytree(data["samples"], copy, ignore=shutil.ignore_patterns("grid.png", "*.json"))
    theirs = torch_fidelity.calculate_metrics(
        input1=str(copy), input2=str(ref_folder), fid=True, isc=True, kid=True, prc=True,
        feature_extractor=EXTRACTOR_NAME, feature_extractor_weights_path=str(data["weights"]), batch_size=32,
        cuda=False, save_cpu_ram=True, cache=False, verbose=False, **options,
    )  # fmt: skip
    pairs = {"fid": "frechet_inception_distance", "is": "inception_score_mean", "is_std": "inception_score_std",
             "kid": "kernel_inception_distance_mean", "kid_std": "kernel_inception_distance_std",
             "precision": "precision", "recall": "recall"}  # fmt: skip
    for ours_key, theirs_key in pairs.items():
        assert ours[ours_key] == pytest.approx(theirs[theirs_key], rel=1e-5, abs=1e-9), ours_key


def _extractor(data, weights=None, counter=None):
    fe = create_feature_extractor(
        EXTRACTOR_NAME, ["penultimate"], cuda=False, feature_extractor_weights_path=str(weights or data["weights"]),
        verbose=False,
    )  # fmt: skip

    def extract(images):
        if counter is not None:
            counter.append(len(images))
        return get_featuresdict_from_dataset(images, fe, 64, False, True, False)

    return extract


def test_reference_statistics_cache(data, tmp_path):
    cache = tmp_path / "cache"
    calls: list[int] = []

    def load(ref, weights):
        return load_reference(ref, extractor=ExtractorSpec(weights_path=str(weights)), fid_layer="penultimate",
                              feature_layers=["penultimate"], extract=_extractor(data, weights, calls),
                              cache_dir=cache)  # fmt: skip

    first = load(data["reference"], data["weights"])
    assert not first.from_cache and calls == [N_REF] and first.num_images == N_REF
    assert all(p.is_file() for p in first.cache_paths)
    second = load(data["reference"], data["weights"])
    assert second.from_cache and calls == [N_REF]  # no image was read again
    assert second.cache_paths == first.cache_paths
    assert torch.equal(second.features["penultimate"], first.features["penultimate"])
    np.testing.assert_array_equal(second.fid_stats["sigma"], first.fid_stats["sigma"])
    # other weights: another key (torch-fidelity's own cache would have reused the entry)
    other = load(data["reference"], data["weights_other"])
    assert not other.from_cache and other.cache_paths != first.cache_paths
    # the key follows content, not location: a copy hits, a changed image misses
    moved = tmp_path / "moved"
    shutil.copytree(data["reference"], moved)
    assert load(moved, data["weights"]).from_cache
    pngs = tmp_path / "pngs"
    write_pngs(pngs, torch.from_numpy(np.load(data["reference"] / "images.npy"))[:60])
    key_a = reference_identity(pngs)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(pngs / "00003.png")
    assert reference_identity(pngs) != key_a


def test_adm_statistics_file_matches_the_image_reference(data, tmp_path):
    # An ADM-style reference batch: mu/sigma of the reference features plus the images arr_0 (NHWC).
    stats = load_reference(data["reference"], extractor=spec(data), fid_layer="penultimate", feature_layers=[],
                           extract=_extractor(data), cache_dir=None).fid_stats  # fmt: skip
    images = np.load(data["reference"] / "images.npy").transpose(0, 2, 3, 1)
    full = tmp_path / "VIRTUAL_embedded_labeled.npz"
    np.savez(full, arr_0=images, mu=stats["mu"], sigma=stats["sigma"])
    kw = {"extractor": spec(data), "kid_subset_size": 50, "progress": False}
    from_folder = compute_metrics(data["samples"], data["reference"], **kw)
    from_file = compute_metrics(data["samples"], full, cache_dir=tmp_path / "cache", **kw)
    for key in from_folder:
        assert from_file[key] == pytest.approx(from_folder[key], rel=1e-6), key
    # statistics alone serve FID and IS; KID and precision/recall need the stored images
    stats_only = tmp_path / "stats_only.npz"
    np.savez(stats_only, mu=stats["mu"], sigma=stats["sigma"])
    r = compute_metrics(data["samples"], stats_only, metrics=("fid", "isc"), **kw)
    assert r["fid"] == pytest.approx(from_folder["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="lacks the images arr_0"):
        compute_metrics(data["samples"], stats_only, metrics=("fid", "prc"), **kw)
    wrong_dim = tmp_path / "wrong_dim.npz"
    np.savez(wrong_dim, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048 features"):
        compute_metrics(data["samples"], wrong_dim, metrics=("fid",), **kw)


def test_missing_files_name_the_file_and_the_param(data, tmp_path):
    missing = tmp_path / "models" / "weights-inception-2015-12-05-6726825d.pth"
    inception = ExtractorSpec(name="inception-v3-compat", weights_path=str(missing))
    with pytest.raises(MissingFileError) as err:
        compute_metrics(data["samples"], data["reference"], extractor=inception, progress=False)
    assert str(missing) in str(err.value) and "evaluate.weights_path" in str(err.value)
    with pytest.raises(MissingFileError, match="evaluate.weights_path"):
        compute_metrics(data["samples"], data["reference"], extractor=ExtractorSpec(name="inception-v3-compat"))
    absent_stats = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(MissingFileError) as err:
        compute_metrics(data["samples"], absent_stats, extractor=spec(data), progress=False)
    assert str(absent_stats) in str(err.value) and "evaluate.reference" in str(err.value)
    with pytest.raises(ValueError, match="unknown feature extractor 'inception-v4'"):
        ExtractorSpec(name="inception-v4", weights_path=str(data["weights"])).layer("fid")


def test_unreadable_sample_images_are_named(data, tmp_path):
    folder = tmp_path / "samples"
    write_samples(folder, data["gen"][:20], data["labels"][:20])
    (folder / "00007.png").write_bytes(b"not a png at all")
    png = (folder / "00011.png").read_bytes()
    (folder / "00011.png").write_bytes(png[: len(png) // 2])  # truncated
    with pytest.raises(CorruptImageError) as err:
        compute_metrics(folder, data["reference"], extractor=spec(data), progress=False)
    assert "00007.png" in str(err.value) and "00011.png" in str(err.value)
    (folder / "00007.png").unlink()
    with pytest.raises(MissingFileError, match="00007.png"):
        open_images(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="unfinished sampling run"):
        open_images(folder)
    plain = tmp_path / "plain"
    write_pngs(plain, data["gen"][:4])
    Image.new("RGB", (64, 64)).save(plain / "00004.png")
    with pytest.raises(CorruptImageError, match="00004.png is 64x64"):
        open_images(plain)


def test_kid_subset_larger_than_the_sets_is_a_clear_error(data):
    with pytest.raises(ValueError, match=r"evaluate.kid_subset_size\) exceeds the 100 generated"):
        compute_metrics(data["samples"], data["reference"], extractor=spec(data), kid_subset_size=150, progress=False)
    with pytest.raises(ValueError, match=r"exceeds the 200 reference"):
        compute_metrics(torch.utils.data.TensorDataset(torch.zeros(300, 3, 32, 32, dtype=torch.uint8)),
                        data["reference"], extractor=spec(data), kid_subset_size=250, progress=False)  # fmt: skip


def test_evaluate_config_defaults_and_strictness():
    cfg = EvaluateConfig()
    kwargs = cfg.metric_kwargs()
    assert kwargs["extractor"].name == EXTRACTOR_NAME and kwargs["metrics"] == ("fid", "isc", "prc", "kid")
    with pytest.raises(Exception, match="kid_subset"):
        EvaluateConfig(kid_subset=10)
    with pytest.raises(Exception, match="metrics"):
        EvaluateConfig(metrics=("fid", "sfid"))


# ----------------------------------------------------------------------------- inception-v3-compat, offline


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its random initial weights (its loader is skipped)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random inception-v3-compat checkpoint with BatchNorm statistics calibrated on one batch.

    Without calibration the running statistics (mean 0, variance 1) do not match the
    activations of a random network and the deep features vanish.
    """
    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    net = _RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
    cfg = EmbeddedConfig(num_train=4, num_reference=4)
    batch, _, _ = generate(cfg, "train", progress=False)
    net.train()
    with torch.no_grad():
        net(batch)
    path = root / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)  # the layout feature_extractor_weights_path expects
    return path


@pytest.fixture
def offline(monkeypatch):
    """Any attempt of torch-fidelity to fetch the Inception weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download weights")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", refuse)


def test_inception_checkpoint_loads_offline(inception_weights, data, offline):
    # 4 + 4 images of 32x32, upsampled to 299 inside torch-fidelity; FID on the 64-d
    # layer to keep the eigen-decomposition small (the 2048-d default is the slow test).
    gen = torch.utils.data.TensorDataset(data["gen"][:4])
    ref = torch.utils.data.TensorDataset(data["gen"][4:8])
    inception = ExtractorSpec(name="inception-v3-compat", weights_path=str(inception_weights),
                              feature_layers={"fid": "64"})  # fmt: skip
    r = compute_metrics(gen, ref, extractor=inception, metrics=("fid", "isc"), isc_splits=1, batch_size=4,
                        progress=False)  # fmt: skip
    assert math.isfinite(r["fid"]) and r["fid"] > 0
    assert math.isfinite(r["is"]) and r["is"] >= 1.0


@pytest.mark.slow
def test_inception_default_layers(inception_weights, data, offline, tmp_path):
    gen = torch.utils.data.TensorDataset(data["gen"][:12])
    ref = torch.utils.data.TensorDataset(data["gen"][12:24])
    inception = ExtractorSpec(name="inception-v3-compat", weights_path=str(inception_weights))
    r = compute_metrics(gen, ref, extractor=inception, metrics=("fid", "isc", "prc"), isc_splits=2, batch_size=12,
                        cache_dir=tmp_path, progress=False)  # fmt: skip
    assert all(math.isfinite(v) for v in r.values()) and r["fid"] > 0


# ----------------------------------------------------------------------------- the evaluate stage


def test_evaluate_stage_writes_the_metrics_file(data, tmp_path, mlflow_uri):
    from pipelines.evaluate import main

    untrained = tmp_path / "untrained"
    noise = torch.randint(0, 256, (N_GEN, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    write_samples(untrained, noise, data["labels"])
    params = {
        "preset": "embedded",
        "tracking": {"enabled": True, "system_metrics": False},
        "rows": {"demar_tiny": {"ablation": "demar", "size": "tiny", "seed": 3}},
        "evaluate": {
            "weights_path": str(data["weights"]),
            "reference": str(data["reference"]),
            "kid_subset_size": 50,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    train_metrics = tmp_path / "train.json"
    train_metrics.write_text(json.dumps({"params_total": 1234}))
    out = tmp_path / "metrics" / "demar_tiny.json"
    rc = main(["--row", "demar_tiny", "--params", str(tmp_path / "params.yaml"), "--samples", str(data["samples"]),
               "--untrained-samples", str(untrained), "--train-metrics", str(train_metrics), "--out", str(out),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert list(record) == sorted(record)  # demar.io writes sorted keys
    assert set(record) == {
        "row", "ablation", "size", "seed", "family", "fid", "is", "is_std", "precision", "recall", "kid", "kid_std",
        "class_accuracy", "fid_untrained", "class_accuracy_untrained", "sec_per_image", "num_images", "params_total",
        "colour_accuracy", "colour_accuracy_untrained",
    }  # fmt: skip
    assert record["colour_accuracy"] is None and record["colour_accuracy_untrained"] is None  # a class row
    assert record["row"] == "demar_tiny" and record["seed"] == 3 and record["num_images"] == N_GEN
    assert record["sec_per_image"] == 0.25 and record["params_total"] == 1234
    assert record["fid_untrained"] > 10 * record["fid"]
    assert record["class_accuracy"] > record["class_accuracy_untrained"]

    import mlflow

    runs = mlflow.search_runs(experiment_names=["demar-embedded"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.demar.row"] == "demar_tiny" and run["tags.demar.seed"] == "3"
    assert run["metrics.evaluate/fid"] == pytest.approx(record["fid"])
