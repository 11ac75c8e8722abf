"""FID, Inception Score, precision/recall and KID through torch-fidelity.

:func:`compute_metrics` scores a folder (or Dataset) of generated images against a
reference: a folder (of images, an embedded data set split, or a samples folder;
see :func:`open_images`), a Dataset, or a statistics file in the format of ADM's
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
* the reference side (features and FID statistics) is cached on disk under a key
  made of the extractor's name, a hash of its weights file and a hash of the
  reference's content (torch-fidelity's own cache key ignores the weights).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
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

from demar.classifier import EXTRACTOR_NAME, as_uint8
from demar.config import StrictConfig
from demar.data.embedded import FORMAT as EMBEDDED_FORMAT
from demar.data.embedded import EmbeddedDataset
from demar.io import file_sha256 as file_digest
from demar.io import read_json, torch_save

__all__ = [
    "ALL_METRICS",
    "ArrayImageDataset",
    "CorruptImageError",
    "EvaluateConfig",
    "ExtractorSpec",
    "ImageFolderDataset",
    "MissingFileError",
    "ReferenceFeatures",
    "UInt8ImageDataset",
    "compute_metrics",
    "file_digest",
    "list_images",
    "load_reference",
    "open_embedded_split",
    "open_images",
    "reference_identity",
    "validate_images",
]

Metric = Literal["fid", "isc", "prc", "kid"]
ALL_METRICS: tuple[Metric, ...] = ("fid", "isc", "prc", "kid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
STATS_SUFFIX = ".npz"
CACHE_FORMAT = "demar-reference-features-v1"
SAMPLES_FORMAT = "demar-samples"  # manifest format of demar.generate's sample folders


class CorruptImageError(ValueError):
    """An image file cannot be read; the message names the file(s)."""


class MissingFileError(FileNotFoundError):
    """A file the evaluation needs is absent; the message says where it belongs."""


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
        return file_digest(self.checked_weights())


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


# ----------------------------------------------------------------------------- image inputs


def list_images(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files (png, jpg, jpeg) under ``root``, sorted.

    Args:
        root: the folder.
        recursive: also look in sub-folders, e.g. one per class (default True).
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def validate_images(files: Sequence[Path]) -> tuple[int, int]:
    """Check that every file opens as an image and all share one size.

    Args:
        files: the image files.

    Returns:
        The common ``(width, height)``.

    Raises:
        CorruptImageError: naming every unreadable file (the first ten) or the
            first file whose size differs.
    """
    bad: list[str] = []
    size: tuple[int, int] | None = None
    for path in files:
        try:
            with Image.open(path) as im:
                im_size = im.size
                im.verify()  # reads the whole file, checks its structure and checksums
        except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
            bad.append(f"{path} ({type(err).__name__}: {err})")
            continue
        if size is None:
            size = im_size
        elif im_size != size:
            raise CorruptImageError(f"image {path} is {im_size[0]}x{im_size[1]}, the others {size[0]}x{size[1]}")
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CorruptImageError("unreadable image file(s): " + "; ".join(bad[:10]) + more)
    if size is None:
        raise CorruptImageError("no image files to read")
    return size


class ImageFolderDataset(Dataset):
    """Image files as uint8 ``[3, H, W]`` RGB tensors, validated up front.

    Args:
        root: the folder (also the base of the relative names in :meth:`digest`).
        files: the files to read, relative to ``root`` or absolute; ``None`` lists
            every image under ``root`` (default None).
        validate: open every file once now, so a corrupt file is an error naming it
            before any feature is extracted (default True).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        files: Sequence[str | os.PathLike[str]] | None = None,
        *,
        validate: bool = True,
    ) -> None:
        self.root = Path(root)
        if files is None:
            self.files = list_images(self.root)
        else:
            self.files = [p if Path(p).is_absolute() else self.root / p for p in map(Path, files)]
            missing = [str(p) for p in self.files if not p.is_file()]
            if missing:
                raise MissingFileError(f"{len(missing)} image file(s) missing, e.g. {missing[0]}")
        if not self.files:
            raise MissingFileError(f"no image files (png, jpg, jpeg) in {self.root}")
        if validate:
            validate_images(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
        except Exception as err:  # noqa: BLE001
            raise CorruptImageError(f"unreadable image file {path} ({type(err).__name__}: {err})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W]

    def digest(self) -> str:
        """SHA-256 over the relative names and bytes of the files (the cache identity)."""
        h = hashlib.sha256()
        for p in self.files:
            try:
                name = p.relative_to(self.root).as_posix()
            except ValueError:
                name = p.name
            h.update(name.encode() + b"\0" + file_digest(p).encode())
        return h.hexdigest()


class ArrayImageDataset(Dataset):
    """A uint8 ``[N, H, W, 3]`` array (ADM's ``arr_0``) as ``[3, H, W]`` tensors.

    Args:
        array: the images.
        identity: a digest of where they came from, for :meth:`digest` (default: hash the array).
    """

    def __init__(self, array: np.ndarray, identity: str | None = None) -> None:
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3] images, got {array.dtype} {array.shape}")
        self.array = array
        self.identity = identity

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[i])).permute(2, 0, 1)  # [3, H, W]

    def digest(self) -> str:
        """The given identity, else SHA-256 of the array's shape and bytes."""
        if self.identity is not None:
            return self.identity
        h = hashlib.sha256(str(self.array.shape).encode())
        h.update(np.ascontiguousarray(self.array).data)
        return h.hexdigest()


class UInt8ImageDataset(Dataset):
    """Adapter giving torch-fidelity what it takes: each item a uint8 ``[3, H, W]`` tensor.

    Args:
        dataset: items that are images or tuples starting with one (e.g. the embedded
            data set's ``(image, label, caption)``); uint8 or float in [-1, 1].
        identity: a digest of the images, for :meth:`digest` (default: the data set's
            own ``digest()``, else a hash over every image).
    """

    def __init__(self, dataset: Dataset, identity: str | None = None) -> None:
        self.dataset = dataset
        self.identity = identity

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        image = as_uint8(torch.as_tensor(image))
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"item {i} is not a [3, H, W] image: {tuple(image.shape)}")
        return image

    def digest(self) -> str:
        """The given identity, the wrapped data set's ``digest()``, else SHA-256 over every image."""
        if self.identity is not None:
            return self.identity
        inner = getattr(self.dataset, "digest", None)
        if callable(inner):
            return inner()
        h = hashlib.sha256()
        for i in range(len(self)):
            x = self[i]
            h.update(str(tuple(x.shape)).encode())
            h.update(x.contiguous().numpy().tobytes())
        return h.hexdigest()


def open_embedded_split(root: str | os.PathLike[str]) -> UInt8ImageDataset | None:
    """The images of an embedded data set split folder (``images.npy`` + manifest), or None if ``root`` is not one.

    Its identity for the cache is the sha256 of ``images.npy`` recorded in the split's manifest.
    """
    manifest = _folder_manifest(Path(root))
    if manifest.get("format") != EMBEDDED_FORMAT:
        return None
    identity = hashlib.sha256(f"{EMBEDDED_FORMAT}|{manifest['sha256']['images.npy']}".encode()).hexdigest()
    return UInt8ImageDataset(EmbeddedDataset(root, output="uint8"), identity=identity)


def _folder_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        return {}
    manifest = read_json(path)
    return manifest if isinstance(manifest, dict) else {}


def open_images(root: str | os.PathLike[str], *, validate: bool = True) -> Dataset:
    """The images of a folder as a Dataset of uint8 ``[3, H, W]`` tensors.

    * an embedded data set split (``images.npy`` and its manifest): its images;
    * a samples folder of :func:`demar.generate.generate` (``manifest.json`` of format
      ``demar-samples``): the images its manifest lists, in order (not ``grid.png``);
      an unfinished run (manifest not ``complete``) is an error;
    * any other folder: every png / jpg / jpeg under it, sorted.

    Args:
        root: the folder.
        validate: open every image file once now, so that an unreadable one is an
            error naming it before any work (default True).
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    embedded = open_embedded_split(root)
    if embedded is not None:
        return embedded
    manifest = _folder_manifest(root)
    if manifest.get("format") == SAMPLES_FORMAT:
        entries = manifest.get("images", [])
        if not manifest.get("complete", False):
            raise ValueError(
                f"{root} holds an unfinished sampling run ({len(entries)} of {manifest.get('num_images')} "
                "images): run the sample stage again to finish it"
            )
        if entries and all("index" not in e for e in entries):  # one png per image
            return ImageFolderDataset(root, [e["file"] for e in entries], validate=validate)
        from demar.generate import GeneratedImages  # shards: arrays, nothing to decode

        return UInt8ImageDataset(GeneratedImages(root, require_complete=False))
    return ImageFolderDataset(root, validate=validate)


def reference_identity(reference: str | os.PathLike[str] | Dataset) -> str:
    """Content digest of a reference (what the statistics cache keys on besides the weights).

    Args:
        reference: a folder (see :func:`open_images`), an ``.npz`` statistics file, or a Dataset.
    """
    if isinstance(reference, Dataset):
        return _digest_of(_as_image_dataset(reference, "reference"))
    path = Path(reference)
    if path.is_file():
        return file_digest(path)
    return _digest_of(open_images(path, validate=False))


def _as_image_dataset(images: str | os.PathLike[str] | Dataset, what: str) -> Dataset:
    if isinstance(images, Dataset):
        ds = images if isinstance(images, (ImageFolderDataset, ArrayImageDataset)) else UInt8ImageDataset(images)
        if len(ds) == 0:
            raise ValueError(f"the {what} data set is empty")
        return ds
    path = Path(images)
    if not path.is_dir():
        raise MissingFileError(f"{what} image folder not found: {path}")
    return open_images(path)


def _digest_of(ds: Dataset) -> str:
    return ds.digest() if hasattr(ds, "digest") else UInt8ImageDataset(ds).digest()


# ----------------------------------------------------------------------------- reference side


@dataclass
class ReferenceFeatures:
    """Features and FID statistics of a reference set under one extractor.

    Attributes:
        features: per layer, the features ``[N, F]`` (for KID and precision/recall).
        fid_stats: ``{"mu": [F], "sigma": [F, F]}`` (float64) of the FID layer, or None.
        num_images: N, or None when only stored statistics are known.
        cache_paths: the cache files read or written.
        from_cache: every needed entry was found in the cache.
    """

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    fid_stats: dict[str, np.ndarray] | None = None
    num_images: int | None = None
    cache_paths: list[Path] = field(default_factory=list)
    from_cache: bool = False


def _stats64(stats: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"mu": np.asarray(stats["mu"], dtype=np.float64), "sigma": np.asarray(stats["sigma"], dtype=np.float64)}


def _npz_keys(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        return {n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")}


def _npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array of an ``.npz`` file, read from its header only."""
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return tuple(shape)


def _cache_entry(cache_dir: Path, extractor: ExtractorSpec, weights_digest: str, ref_digest: str, layer: str) -> Path:
    key = hashlib.sha256(f"{extractor.name}|{weights_digest}|{ref_digest}|{layer}".encode()).hexdigest()[:32]
    return cache_dir / f"{extractor.name}-{layer}-{key}.pt"


def _check_reference(path: Path, reference_key: str = "evaluate.reference") -> None:
    if not (path.is_dir() or (path.is_file() and path.suffix == STATS_SUFFIX)):
        what = "not a folder or .npz file" if path.exists() else "not found"
        raise MissingFileError(
            f"reference {what}: {path}. Set {reference_key} in params.yaml to a folder of reference "
            f"images or an ADM reference batch (.npz with mu and sigma, e.g. VIRTUAL_imagenet256_labeled.npz)."
        )


def load_reference(
    reference: str | os.PathLike[str] | Dataset,
    *,
    extractor: ExtractorSpec,
    fid_layer: str | None,
    feature_layers: Iterable[str],
    extract: Callable[[Dataset], dict[str, torch.Tensor]],
    cache_dir: str | os.PathLike[str] | None,
    reference_key: str = "evaluate.reference",
) -> ReferenceFeatures:
    """Features and FID statistics of the reference, from the cache when possible.

    On a cache hit no image is decoded: only the reference's bytes are hashed.

    Args:
        reference: a folder of images, a Dataset of images, or an ADM-style ``.npz``
            file (``mu``, ``sigma`` for FID; ``arr_0`` images for the other metrics).
        extractor: the extractor; its weights hash is part of the cache key.
        fid_layer: the layer whose statistics FID needs, or None without FID.
        feature_layers: layers whose full features are needed (KID, precision/recall).
        extract: maps an image Dataset to ``{layer: [N, F]}`` features (called on a miss only).
        cache_dir: cache folder; None disables the cache.
        reference_key: the params key naming ``reference``, quoted in errors
            (default ``"evaluate.reference"``).
    """
    feature_layers = sorted(set(feature_layers))
    out = ReferenceFeatures()
    # The images behind the reference, built only when features must be extracted.
    make_images: Callable[[], Dataset]
    ref_digest: Callable[[], str]

    if isinstance(reference, Dataset):
        images = _as_image_dataset(reference, "reference")
        make_images, ref_digest = (lambda: images), (lambda: _digest_of(images))
        out.num_images = len(images)
    else:
        path = Path(reference)
        if path.is_dir():
            folder = open_images(path, validate=False)

            def make_images() -> Dataset:
                if isinstance(folder, ImageFolderDataset):
                    validate_images(folder.files)
                return folder

            ref_digest = folder.digest
            out.num_images = len(folder)
        elif path.is_file() and path.suffix == STATS_SUFFIX:
            keys = _npz_keys(path)
            if fid_layer is not None and {"mu", "sigma"} <= keys:
                with np.load(path) as npz:
                    out.fid_stats = _stats64({"mu": npz["mu"], "sigma": npz["sigma"]})
                fid_layer = None  # FID uses the stored statistics, not the stored images
            if fid_layer is not None or feature_layers:
                if "arr_0" not in keys:
                    need = "mu and sigma" if fid_layer is not None else "the images arr_0 (KID, precision/recall)"
                    raise ValueError(f"reference statistics file {path} lacks {need}; it holds {sorted(keys)}")
                out.num_images = _npz_array_shape(path, "arr_0")[0]
            ref_digest = functools.cache(lambda: file_digest(path))  # hashed only when the cache is used

            def make_images() -> Dataset:
                with np.load(path) as npz:
                    return ArrayImageDataset(npz["arr_0"], identity=ref_digest())
        else:
            _check_reference(path, reference_key)

    layers = sorted(set(feature_layers) | ({fid_layer} if fid_layer is not None else set()))
    if not layers:
        return out
    entries: dict[str, Path] = {}
    cached: dict[str, dict[str, Any]] = {}
    if cache_dir is not None:
        weights_digest, digest_ = extractor.digest(), ref_digest()
        for layer in layers:
            entries[layer] = _cache_entry(Path(cache_dir), extractor, weights_digest, digest_, layer)
            if entries[layer].is_file():
                entry = torch.load(entries[layer], map_location="cpu", weights_only=True)
                if entry.get("format") == CACHE_FORMAT:
                    cached[layer] = entry
    out.cache_paths = list(entries.values())
    out.from_cache = len(cached) == len(layers)
    if not out.from_cache:
        feats = extract(make_images())
        for layer in layers:
            if layer in cached:
                continue
            stats = _stats64(fid_features_to_statistics(feats[layer]))
            cached[layer] = {
                "format": CACHE_FORMAT,
                "features": feats[layer],
                "mu": torch.from_numpy(stats["mu"]),
                "sigma": torch.from_numpy(stats["sigma"]),
            }
            if layer in entries:
                torch_save(cached[layer], entries[layer])
    for layer in feature_layers:
        out.features[layer] = cached[layer]["features"]
    if fid_layer is not None:
        out.fid_stats = _stats64({"mu": cached[fid_layer]["mu"].numpy(), "sigma": cached[fid_layer]["sigma"].numpy()})
    return out


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
        generated: a folder (read by :func:`open_images`: a samples folder's manifest
            images, or every png / jpg under it; all validated first) or a Dataset of
            uint8 ``[3, H, W]`` images (or of tuples starting with one, e.g.
            :class:`demar.generate.GeneratedImages`).
        reference: a folder (see :func:`open_images`; e.g. the embedded reference
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
        _check_reference(Path(reference))
    gen = _as_image_dataset(generated, "generated")
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
        gen_stats = _stats64(fid_features_to_statistics(feats[layers["fid"]]))
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
