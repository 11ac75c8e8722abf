"""FID, Inception Score, precision/recall and KID through torch-fidelity.

:func:`compute_metrics` scores a folder (or Dataset) of generated images against a
reference: a folder (of images, an embedded data set split, or a samples folder;
see :func:`demar.image_sets.open_images`), a Dataset, or a statistics file in the format of ADM's
reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``mu`` and ``sigma``
of the 2048-d pool features, plus the images ``arr_0`` that precision/recall and
KID need). The paper's ImageNet protocol (method.md, "Training and evaluation
protocol") is ADM's suite: FID against those stored statistics, precision/recall
(k = 3) against the 10,000 stored images, IS over 10 splits of 50,000 samples from
the bias-free logits (torch-fidelity's ``logits_unbiased``, as ADM's softmax graph).

How torch-fidelity is used:

* features come from torch-fidelity's feature extractors (``inception-v3-compat``
  for ImageNet, :data:`demar.classifier.EXTRACTOR_NAME` for the embedded domain),
  created with ``feature_extractor_weights_path`` from a local file: nothing is
  ever downloaded, and a missing file fails before any work;
* the metrics are torch-fidelity's own functions (``isc_features_to_metric``,
  ``fid_features_to_statistics`` / ``fid_statistics_to_metric``,
  ``kid_features_to_metric``, ``prc_features_to_metric``), given the same options
  as ``calculate_metrics``. They are called on features extracted once, instead of
  through ``calculate_metrics``, because that function can neither take stored
  statistics nor return the generated features needed to compare with them;
* the reference side (features and FID statistics) is cached on disk by
  :mod:`demar.reference_stats`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from demar.classifier import EXTRACTOR_NAME
from demar.config import StrictConfig
from demar.image_sets import as_image_dataset
from demar.images import MissingFileError
from demar.io import file_sha256
from demar.reference_stats import ReferenceFeatures, check_reference, load_reference, stats64

__all__ = ["ALL_METRICS", "EvaluateConfig", "ExtractorSpec", "Metric", "compute_metrics"]

Metric = Literal["fid", "isc", "prc", "kid"]
ALL_METRICS: tuple[Metric, ...] = ("fid", "isc", "prc", "kid")


# ----------------------------------------------------------------------------- configuration


class ExtractorSpec(StrictConfig):
    """Which feature extractor scores the images, and its local weights.

    Attributes:
        name: a torch-fidelity feature extractor, e.g. ``"inception-v3-compat"`` or
            ``"demar-classifier"`` (default ``"demar-classifier"``).
        weights_path: its weights file, passed as ``feature_extractor_weights_path``;
            required, since nothing is downloaded (default None).
        feature_layers: per-metric layer overrides (``fid``, ``isc``, ``kid``, ``prc``);
            a metric not named uses the extractor's default layer (default ``{}``).
        param_key: the params key that names ``weights_path``, quoted in errors
            (default ``"evaluate.weights_path"``).
    """

    name: str = EXTRACTOR_NAME
    weights_path: str | None = None
    feature_layers: dict[Metric, str] = Field(default_factory=dict)
    param_key: str = "evaluate.weights_path"

    def layer(self, metric: Metric) -> str:
        """The feature layer used for ``metric``."""
        if metric in self.feature_layers:
            return self.feature_layers[metric]
        return self.extractor_class().get_default_feature_layer_for_metric(metric)

    def extractor_class(self) -> type:
        """The registered torch-fidelity class; an unknown name is a ``ValueError``."""
        if self.name not in FEATURE_EXTRACTORS_REGISTRY:
            known = ", ".join(sorted(FEATURE_EXTRACTORS_REGISTRY))
            raise ValueError(f"unknown feature extractor {self.name!r}; registered: {known}")
        return FEATURE_EXTRACTORS_REGISTRY[self.name]

    def checked_weights(self) -> Path:
        """The weights file, or :class:`MissingFileError` saying where it belongs."""
        hint = (
            " For inception-v3-compat this is torch-fidelity's converted Inception file "
            "weights-inception-2015-12-05-6726825d.pth (fetch it on a machine with internet access)."
            if self.name == "inception-v3-compat"
            else " It is written by the train_classifier stage."
            if self.name == EXTRACTOR_NAME
            else ""
        )
        if self.weights_path is None:
            raise MissingFileError(
                f"no weights file given for feature extractor {self.name!r}: set {self.param_key} in "
                f"params.yaml (weights are never downloaded).{hint}"
            )
        path = Path(self.weights_path)
        if not path.is_file():
            raise MissingFileError(
                f"weights file of feature extractor {self.name!r} not found: {path}. Put the file "
                f"there or point {self.param_key} in params.yaml to it.{hint}"
            )
        return path

    def digest(self) -> str:
        """SHA-256 of the weights file (part of the reference cache key)."""
        return file_sha256(self.checked_weights())


class EvaluateConfig(StrictConfig):
    """Knobs of the ``evaluate`` stage (``params.yaml: evaluate``).

    Attributes:
        extractor: torch-fidelity feature extractor name (default ``"demar-classifier"``).
        weights_path: its local weights file (default ``"models/classifier.pt"``).
        feature_layers: per-metric layer overrides, see :class:`ExtractorSpec` (default ``{}``).
        reference: folder of reference images, or an ADM-style ``.npz`` statistics
            file (default ``"data/embedded/reference"``).
        metrics: which of ``fid``, ``isc``, ``prc``, ``kid`` to compute (default all).
        batch_size: images per feature-extraction batch (default 64).
        isc_splits: IS splits (default 10, as ADM over 50,000 samples).
        kid_subsets: KID subsets (default 100).
        kid_subset_size: images per KID subset; at most the smaller image count (default 1000).
        prc_neighborhood: k of the k-NN manifolds of precision/recall (default 3, as ADM).
        prc_batch_size: rows per distance block in precision/recall (default 10000).
        rng_seed: seed of the IS shuffle and KID subsets (default 2020).
        cache_dir: where reference features and statistics are cached (default ``"cache/fid_stats"``).
        class_accuracy: also report the embedded classifier's class accuracy; needs
            ``extractor == "demar-classifier"`` and requested labels (default True).
    """

    extractor: str = EXTRACTOR_NAME
    weights_path: str | None = "models/classifier.pt"
    feature_layers: dict[Metric, str] = Field(default_factory=dict)
    reference: str = "data/embedded/reference"
    metrics: tuple[Metric, ...] = Field(ALL_METRICS, min_length=1)
    batch_size: int = Field(64, ge=1)
    isc_splits: int = Field(10, ge=1)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    prc_neighborhood: int = Field(3, ge=1)
    prc_batch_size: int = Field(10000, ge=1)
    rng_seed: int = 2020
    cache_dir: str = "cache/fid_stats"
    class_accuracy: bool = True

    def extractor_spec(self) -> ExtractorSpec:
        """The :class:`ExtractorSpec` these settings name."""
        return ExtractorSpec(name=self.extractor, weights_path=self.weights_path, feature_layers=self.feature_layers)

    def metric_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`compute_metrics` (all but the inputs)."""
        return {
            "extractor": self.extractor_spec(),
            "metrics": self.metrics,
            "batch_size": self.batch_size,
            "isc_splits": self.isc_splits,
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": self.kid_subset_size,
            "prc_neighborhood": self.prc_neighborhood,
            "prc_batch_size": self.prc_batch_size,
            "rng_seed": self.rng_seed,
            "cache_dir": self.cache_dir,
        }


# ----------------------------------------------------------------------------- metrics


def compute_metrics(
    generated: str | os.PathLike[str] | Dataset,
    reference: str | os.PathLike[str] | Dataset | None,
    *,
    extractor: ExtractorSpec,
    metrics: Sequence[Metric] = ALL_METRICS,
    batch_size: int = 64,
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    prc_batch_size: int = 10000,
    rng_seed: int = 2020,
    cache_dir: str | os.PathLike[str] | None = None,
    cuda: bool | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Score generated images against a reference with torch-fidelity.

    The defaults are torch-fidelity's (and ADM's); the ``evaluate`` stage passes
    :meth:`EvaluateConfig.metric_kwargs`.

    Args:
        generated: a folder (read by :func:`demar.image_sets.open_images`: a samples folder's manifest
            images, or every png / jpg under it; all validated first) or a Dataset of
            uint8 ``[3, H, W]`` images (or of tuples starting with one, e.g.
            :class:`demar.images.GeneratedImages`).
        reference: a folder (see :func:`demar.image_sets.open_images`; e.g. the embedded reference
            split), a Dataset, or an ADM-style ``.npz`` statistics file; may be None
            when only ``isc`` is requested.
        extractor: the feature extractor and its local weights.
        metrics: subset of ``("fid", "isc", "prc", "kid")`` (default all four).
        batch_size: images per feature-extraction batch (default 64).
        isc_splits: IS splits (default 10).
        kid_subsets: KID subsets (default 100).
        kid_subset_size: images per KID subset, at most the smaller set (default 1000).
        prc_neighborhood: k of precision/recall's k-NN radii (default 3).
        prc_batch_size: rows per distance block in precision/recall (default 10000).
        rng_seed: seed of the IS shuffle and KID subsets (default 2020).
        cache_dir: folder caching the reference features and statistics; None disables it (default None).
        cuda: run the extractor on the GPU; None = ``torch.cuda.is_available()`` (default None).
        progress: torch-fidelity's progress bars and messages (default True).

    Returns:
        Flat metrics for what was requested: ``fid``; ``is``, ``is_std``;
        ``precision``, ``recall``; ``kid``, ``kid_std``.
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {ALL_METRICS}, got {tuple(metrics)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    weights = extractor.checked_weights()  # fail fast on missing files, before reading any image
    needs_ref = any(m in metrics for m in ("fid", "kid", "prc"))
    if needs_ref and reference is None:
        raise ValueError("FID, KID and precision/recall need a reference")
    if needs_ref and not isinstance(reference, Dataset):
        check_reference(Path(reference))
    gen = as_image_dataset(generated, "generated")
    if "kid" in metrics and kid_subset_size > len(gen):
        raise ValueError(
            f"KID subset size {kid_subset_size} (evaluate.kid_subset_size) exceeds the {len(gen)} generated images"
        )

    layers = {m: extractor.layer(m) for m in metrics}
    options = {
        "feature_extractor_weights_path": str(weights),
        "verbose": progress,
        "isc_splits": isc_splits,
        "kid_subsets": kid_subsets,
        "kid_subset_size": kid_subset_size,
        "prc_neighborhood": prc_neighborhood,
        "prc_batch_size": prc_batch_size,
        "samples_shuffle": True,
        "rng_seed": rng_seed,
        "save_cpu_ram": True,
    }
    fe = create_feature_extractor(extractor.name, sorted(set(layers.values())), cuda=cuda, **options)

    def extract(images: Dataset) -> dict[str, torch.Tensor]:
        return get_featuresdict_from_dataset(images, fe, batch_size, cuda, True, progress)

    ref = ReferenceFeatures()
    if needs_ref:
        ref = load_reference(
            reference,
            extractor=extractor,
            fid_layer=layers.get("fid"),
            feature_layers=[layers[m] for m in ("kid", "prc") if m in metrics],
            extract=extract,
            cache_dir=cache_dir,
        )
        if "kid" in metrics and ref.num_images is not None and kid_subset_size > ref.num_images:
            raise ValueError(
                f"KID subset size {kid_subset_size} (evaluate.kid_subset_size) exceeds the "
                f"{ref.num_images} reference images"
            )

    feats = extract(gen)
    out: dict[str, float] = {}
    if "isc" in metrics:
        r = isc_features_to_metric(feats[layers["isc"]], isc_splits, True, rng_seed)
        out["is"], out["is_std"] = r["inception_score_mean"], r["inception_score_std"]
    if "fid" in metrics:
        gen_stats = stats64(fid_features_to_statistics(feats[layers["fid"]]))
        assert ref.fid_stats is not None
        if gen_stats["mu"].shape != ref.fid_stats["mu"].shape:
            raise ValueError(
                f"reference statistics have {ref.fid_stats['mu'].shape[0]} features but layer "
                f"{layers['fid']!r} of {extractor.name} gives {gen_stats['mu'].shape[0]}"
            )
        out["fid"] = fid_statistics_to_metric(gen_stats, ref.fid_stats, progress)["frechet_inception_distance"]
    if "kid" in metrics:
        r = kid_features_to_metric(feats[layers["kid"]], ref.features[layers["kid"]], **options)
        out["kid"], out["kid_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
    if "prc" in metrics:
        r = prc_features_to_metric(feats[layers["prc"]], ref.features[layers["prc"]], **options)
        out["precision"], out["recall"] = r["precision"], r["recall"]
    return {k: float(v) if math.isfinite(v) else float("nan") for k, v in out.items()}
