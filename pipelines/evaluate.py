"""DVC stage ``evaluate@<row>``: FID, IS, precision/recall, KID and class accuracy of a row's samples.

Reads ``params.yaml``: ``evaluate`` (:class:`demar.metrics.EvaluateConfig`),
``rows.<row>`` (``ablation``, ``size``, ``seed``), ``preset`` and ``tracking``.
Scores ``samples/<row>/`` (written by the ``sample`` stage) against
``evaluate.reference`` with :func:`demar.metrics.compute_metrics`; on the embedded
preset (extractor ``demar-classifier``) it also reports the share of samples the
classifier assigns to the class they were drawn for. With ``--untrained-samples``
(``samples/<row>_untrained/``) the same FID and class accuracy of an untrained
model of the same config are reported as ``fid_untrained`` and
``class_accuracy_untrained``. For a text row (a manifest with captions), the class is
the shape its caption names, and ``colour_accuracy`` is the share of images whose
shape has the colour the caption names, read from the pixels (null for class rows).

Writes ``metrics/evaluate/<row>.json`` with the keys of docs/architecture.md
(unknown values are null) and logs them to an MLflow run tagged with the row and seed.

``python -m pipelines.evaluate --row demar [--samples samples/demar] [--untrained-samples samples/demar_untrained]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from demar.distributed import resolve_device
from demar.image_sets import open_images
from demar.io import read_json, write_json
from demar.metrics import EvaluateConfig, compute_metrics
from demar.tracking import stage_run
from pipelines import load_stage_params, run_stage
from reports.data import family_of

METRIC_KEYS = ("fid", "is", "is_std", "precision", "recall", "kid", "kid_std")


def requested_labels(samples: Path) -> list[int] | None:
    """The class each image of a samples folder was drawn for (from its manifest), or None if unknown."""
    manifest_path = samples / "manifest.json"
    if not manifest_path.is_file():
        return None
    entries = read_json(manifest_path).get("images") or []
    if not entries or any("label" not in e for e in entries):
        return None
    return [int(e["label"]) for e in entries]


def sample_class_accuracy(cfg: EvaluateConfig, samples: Path, device: str) -> float | None:
    """Class accuracy of a samples folder under the embedded classifier; None where it does not apply."""
    from demar.classifier import EXTRACTOR_NAME, class_accuracy, load_classifier

    if not cfg.class_accuracy or cfg.extractor != EXTRACTOR_NAME:
        return None
    labels = requested_labels(samples)
    if labels is None:
        return None
    classifier = load_classifier(cfg.extractor_spec().checked_weights(), map_location=device)
    return class_accuracy(open_images(samples, validate=False), labels, classifier)


def sample_colour_accuracy(samples: Path) -> float | None:
    """Fraction of a text row's images whose shape has the colour their caption names, read from the
    pixels (:func:`demar.data.embedded.colour_accuracy`); None for class rows or captions without colours."""
    from demar.data.embedded import colour_accuracy
    from demar.images import GeneratedImages

    manifest_path = samples / "manifest.json"
    if not manifest_path.is_file():
        return None
    entries = read_json(manifest_path).get("images") or []
    if not entries or any("caption" not in e for e in entries):
        return None
    drawn = GeneratedImages(samples)
    return colour_accuracy([drawn[i][0] for i in range(len(drawn))], [e["caption"] for e in entries])


def sec_per_image(samples: Path) -> float | None:
    """Seconds per image of sampling + decoding, from the folder's ``timing.json`` (None if absent)."""
    path = samples / "timing.json"
    return read_json(path).get("sec_per_image") if path.is_file() else None


def params_total(train_metrics: Path | None) -> int | None:
    """The row's parameter count from ``metrics/train/<row>.json`` (None if not given or absent)."""
    if train_metrics is None or not train_metrics.is_file():
        return None
    return read_json(train_metrics).get("params_total")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", required=True, help="the row of params.yaml (rows.<row>)")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--samples", default=None, help="samples folder (default: samples/<row>)")
    p.add_argument("--untrained-samples", default=None, help="samples of the untrained model (default: none)")
    p.add_argument("--reference", default=None, help="override of evaluate.reference (folder or .npz)")
    p.add_argument("--train-metrics", default=None, help="metrics/train/<row>.json, for params_total (default: none)")
    p.add_argument("--out", default=None, help="metrics file (default: metrics/evaluate/<row>.json)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = p.parse_args(argv)

    params = load_stage_params(args.params)
    cfg, row, preset, tracking = params.evaluate, params.row(args.row), params.preset, params.tracking
    samples = Path(args.samples or f"samples/{args.row}")
    untrained = Path(args.untrained_samples) if args.untrained_samples else None
    reference = args.reference or cfg.reference
    out_file = Path(args.out or f"metrics/evaluate/{args.row}.json")
    device = resolve_device(args.device)
    kwargs = {**cfg.metric_kwargs(), "cuda": device.type == "cuda", "progress": not args.no_progress}
    cfg.extractor_spec().checked_weights()  # a missing weights file fails before any work

    with stage_run(
        "evaluate", preset=preset, row=args.row, seed=row.seed, params={"evaluate": cfg.model_dump(mode="json")},
        enabled=tracking.enabled and not args.no_mlflow, system_metrics=tracking.system_metrics,
    ) as run:  # fmt: skip
        start = time.perf_counter()
        images = open_images(samples)
        scores = compute_metrics(images, reference, **kwargs)
        record: dict[str, Any] = {
            "row": args.row,
            "ablation": row.ablation,
            "size": row.size,
            "seed": row.seed,
            "family": family_of(row.ablation),
            **{k: scores.get(k) for k in METRIC_KEYS},
            "class_accuracy": sample_class_accuracy(cfg, samples, str(device)),
            "colour_accuracy": sample_colour_accuracy(samples),
            "fid_untrained": None,
            "class_accuracy_untrained": None,
            "colour_accuracy_untrained": None,
            "sec_per_image": sec_per_image(samples),
            "num_images": len(images),
            "params_total": params_total(Path(args.train_metrics) if args.train_metrics else None),
        }
        if untrained is not None:
            untrained_scores = compute_metrics(open_images(untrained), reference, **{**kwargs, "metrics": ("fid",)})
            record["fid_untrained"] = untrained_scores["fid"]
            record["class_accuracy_untrained"] = sample_class_accuracy(cfg, untrained, str(device))
            record["colour_accuracy_untrained"] = sample_colour_accuracy(untrained)
        wall_s = time.perf_counter() - start
        write_json(out_file, record)
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.log_metrics({**{f"evaluate/{k}": v for k, v in numeric.items() if k != "seed"}, "evaluate/wall_s": wall_s})
        run.log_dict(record, "evaluate.json")
        run.set_tags({"demar.reference": str(reference), "demar.extractor": cfg.extractor})
    shown = ", ".join(f"{k} {record[k]:.4g}" for k in ("fid", "is", "precision", "recall", "class_accuracy")
                      if record.get(k) is not None)  # fmt: skip
    print(f"{args.row}: {shown} ({record['num_images']} images, {wall_s:.1f} s); wrote {out_file}")
    return 0


if __name__ == "__main__":
    run_stage(main, "evaluate")
