"""DVC stage ``train_classifier``: the embedded domain's classifier (the feature extractor of its metrics).

Reads ``params.yaml``: ``classifier`` (:class:`demar.classifier.ClassifierConfig`),
``preset`` and ``tracking``. Trains on ``data/embedded/train`` and measures the
accuracy on ``data/embedded/reference``. Writes ``models/classifier.pt`` (the file
``evaluate.weights_path`` names on the embedded preset) and
``metrics/classifier.json`` (``accuracy`` on the reference split, per-class
accuracy, ``train_accuracy``, image counts, ``params_total``, ``wall_s``).

``python -m pipelines.train_classifier [--data data/embedded] [--out models/classifier.pt]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from demar.classifier import (
    EXTRACTOR_NAME,
    class_accuracy,
    dataset_to_tensors,
    predict,
    save_classifier,
    train_classifier,
)
from demar.config import ConfigError
from demar.data.embedded import EmbeddedDataset
from demar.io import torch_save, write_json
from demar.tracking import stage_run
from pipelines import load_stage_params, run_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--data", default="data/embedded", help="folder of train/ and reference/ (default: %(default)s)")
    p.add_argument("--out", default="models/classifier.pt", help="weights file (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/classifier.json", help="metrics file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = p.parse_args(argv)

    params = load_stage_params(args.params)
    cfg, preset, tracking = params.classifier, params.preset, params.tracking
    extractor = params.evaluate.extractor
    if extractor != EXTRACTOR_NAME:  # e.g. ImageNet: evaluation uses Inception, no domain classifier
        note = f"not trained: evaluate.extractor is {extractor!r}, not {EXTRACTOR_NAME!r}"
        torch_save({"skipped": note}, args.out)
        write_json(args.metrics, {"skipped": note})
        print(f"classifier {note}")
        return 0
    train_set = EmbeddedDataset(Path(args.data) / "train", output="uint8")
    reference_set = EmbeddedDataset(Path(args.data) / "reference", output="uint8")
    if train_set.num_classes != cfg.num_classes:
        raise ConfigError(
            f"invalid configuration in {args.params}:\n  classifier.num_classes: {cfg.num_classes}, but "
            f"{args.data} has {train_set.num_classes} classes"
        )

    with stage_run(
        "train_classifier", preset=preset, params={"classifier": cfg.model_dump(mode="json")},
        enabled=tracking.enabled and not args.no_mlflow, system_metrics=tracking.system_metrics,
    ) as run:  # fmt: skip
        start = time.perf_counter()
        images, labels = dataset_to_tensors(train_set)
        model = train_classifier(cfg, images, labels, progress=not args.no_progress)
        train_s = time.perf_counter() - start
        ref_images, ref_labels = dataset_to_tensors(reference_set)
        pred = predict(model, ref_images)
        per_class = [
            float((pred[ref_labels == c] == c).float().mean()) if (ref_labels == c).any() else None
            for c in range(cfg.num_classes)
        ]
        n_train = len(images) if cfg.max_train_images is None else min(len(images), cfg.max_train_images)
        metrics = {
            "accuracy": float((pred == ref_labels).float().mean()),
            "accuracy_per_class": dict(zip(reference_set.classes, per_class, strict=True)),
            "train_accuracy": class_accuracy(images[:n_train], labels[:n_train], model),
            "num_train": n_train,
            "num_reference": len(ref_labels),
            "params_total": sum(t.numel() for t in model.parameters()),
            "train_s": train_s,
            "wall_s": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
        }
        save_classifier(args.out, model, extra={"accuracy": metrics["accuracy"], "data": str(args.data)})
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_metrics({f"accuracy/{name}": v for name, v in metrics["accuracy_per_class"].items() if v is not None})
        run.log_artifact(args.metrics)
    print(
        f"classifier: {metrics['accuracy']:.2%} on {metrics['num_reference']} reference images "
        f"(train {metrics['train_accuracy']:.2%}, {train_s:.1f} s); wrote {args.out}, {args.metrics}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main, "train_classifier")
