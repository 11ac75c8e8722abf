"""The embedded-domain classifier: training, checkpoints, class accuracy, torch-fidelity extractor."""

from __future__ import annotations

import time

import pytest
import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from demar.classifier import (
    EXTRACTOR_NAME,
    ClassifierConfig,
    ClassifierFeatureExtractor,
    ShapeClassifier,
    class_accuracy,
    dataset_to_tensors,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from demar.config import ConfigError, validate
from demar.data.embedded import EmbeddedConfig, EmbeddedDataset, generate, write_split


@pytest.fixture(scope="module")
def shapes():
    """A small embedded train split (5000 images) and reference split (500 images), in memory."""
    cfg = EmbeddedConfig(num_train=5000, num_reference=500)
    train_images, train_attrs, _ = generate(cfg, "train", progress=False)
    ref_images, ref_attrs, _ = generate(cfg, "reference", progress=False)
    return train_images, train_attrs.shape, ref_images, ref_attrs.shape


@pytest.fixture(scope="module")
def trained(shapes):
    """A classifier trained briefly on the small split, with its training time."""
    images, labels, _, _ = shapes
    cfg = ClassifierConfig(epochs=4, batch_size=64)
    start = time.perf_counter()
    model = train_classifier(cfg, images, labels, progress=False)
    return model, time.perf_counter() - start


def test_trains_to_high_accuracy_on_held_out_shapes(shapes, trained):
    # 5000 images x 4 epochs of the default architecture: about 97% on the
    # reference split (the full stage, 20000 x 3 epochs, reaches 99.8%).
    _, _, ref_images, ref_labels = shapes
    model, seconds = trained
    acc = class_accuracy(ref_images, ref_labels, model)
    assert acc >= 0.9, f"reference accuracy {acc:.3f} after {seconds:.1f} s"


def test_training_is_deterministic_under_its_seed(shapes):
    images, labels, ref_images, _ = shapes
    cfg = ClassifierConfig(epochs=1, max_train_images=256, channels=(8, 16), feature_dim=16)
    a = train_classifier(cfg, images, labels, progress=False)
    b = train_classifier(cfg, images, labels, progress=False)
    c = train_classifier(cfg.model_copy(update={"seed": 1}), images, labels, progress=False)
    x = a.prepare(ref_images[:32])
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x), c(x))


def test_checkpoint_round_trip_rebuilds_the_same_network(tmp_path, shapes, trained):
    model, _ = trained
    _, _, ref_images, _ = shapes
    path = tmp_path / "classifier.pt"
    save_classifier(path, model, extra={"accuracy": 0.5})
    loaded = load_classifier(path)
    assert loaded.cfg == model.cfg and not loaded.training
    x = model.prepare(ref_images[:16])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier") as err:
        load_classifier(tmp_path / "absent.pt")
    assert "evaluate.weights_path" in str(err.value)
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(ValueError, match="not a demar-classifier"):
        load_classifier(bad)


def test_class_accuracy_counts_requested_classes(shapes, trained):
    model, _ = trained
    _, _, ref_images, _ = shapes
    images = ref_images[:100]
    pred = predict(model, images)
    assert class_accuracy(images, pred, model) == 1.0
    wrong = (pred + 1) % model.cfg.num_classes
    assert class_accuracy(images, wrong, model) == 0.0
    half = torch.where(torch.arange(100) < 50, pred, wrong)
    assert class_accuracy(images, half, model) == pytest.approx(0.5)
    # float images in [-1, 1] and a Dataset of (image, label, caption) give the same answer
    as_float = images.float() / 127.5 - 1
    assert class_accuracy(as_float, half, model) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="100 images but 99"):
        class_accuracy(images, half[:99], model)


def test_dataset_to_tensors_reads_the_embedded_split(tmp_path):
    cfg = EmbeddedConfig(num_train=40, num_reference=20)
    write_split(cfg, "reference", tmp_path / "reference", progress=False)
    ds = EmbeddedDataset(tmp_path / "reference")  # float images in [-1, 1]
    images, labels = dataset_to_tensors(ds, limit=12)
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(ds.images[:12].copy()))
    assert labels.tolist() == ds.labels[:12].tolist()


def test_feature_extractor_through_torch_fidelity(tmp_path, shapes, trained):
    model, _ = trained
    _, _, ref_images, _ = shapes
    path = tmp_path / "classifier.pt"
    save_classifier(path, model)
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] is ClassifierFeatureExtractor
    fe = create_feature_extractor(
        EXTRACTOR_NAME, ["logits", "penultimate"], cuda=False, feature_extractor_weights_path=str(path), verbose=False
    )
    logits, feats = fe(ref_images[:8])
    assert logits.shape == (8, model.cfg.num_classes) and feats.shape == (8, model.cfg.feature_dim)
    with torch.no_grad():
        x = model.prepare(ref_images[:8])
        torch.testing.assert_close(feats, model.features(x))
        torch.testing.assert_close(logits, model(x))
    # other resolutions are resized to the classifier's
    big = torch.nn.functional.interpolate(ref_images[:8].float(), scale_factor=2, mode="nearest").to(torch.uint8)
    logits_big, _ = fe(big)
    assert (logits_big.argmax(1) == logits.argmax(1)).float().mean() >= 0.75
    assert ClassifierFeatureExtractor.get_default_feature_layer_for_metric("isc") == "logits"
    assert ClassifierFeatureExtractor.get_default_feature_layer_for_metric("fid") == "penultimate"
    with pytest.raises(ValueError, match="uint8"):
        fe(ref_images[:2].float())
    with pytest.raises(FileNotFoundError, match="evaluate.weights_path"):
        ClassifierFeatureExtractor(EXTRACTOR_NAME, ["logits"])


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="classifier.widths: unknown key"):
        validate(ClassifierConfig, {"widths": [8]}, prefix="classifier")
    with pytest.raises(ConfigError, match="classifier.global_pool"):
        validate(ClassifierConfig, {"global_pool": "median"}, prefix="classifier")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        train_classifier(ClassifierConfig(num_classes=3), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                         torch.tensor([0, 1, 2, 3]), progress=False)  # fmt: skip
    assert sum(p.numel() for p in ShapeClassifier(ClassifierConfig()).parameters()) < 100_000
