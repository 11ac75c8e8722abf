"""The reference side of the metrics: features and FID statistics of a reference set, cached on disk.

The cache key is made of the extractor's name, a hash of its weights file, a hash of
the reference's content and the layer (torch-fidelity's own cache key ignores the
weights). A reference is a folder (see :func:`demar.image_sets.open_images`), a Dataset,
or an ADM-style ``.npz`` file: ``mu`` and ``sigma`` for FID, the images ``arr_0`` for
KID and precision/recall.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics

from demar.image_sets import as_image_dataset, image_set_digest, open_images
from demar.images import ArrayImageDataset, ImageFolderDataset, MissingFileError, validate_images
from demar.io import UnreadableFileError, UnsafeFileError, file_sha256, torch_load, torch_save

if TYPE_CHECKING:
    from demar.metrics import ExtractorSpec

__all__ = ["CACHE_FORMAT", "STATS_SUFFIX", "ReferenceFeatures", "check_reference", "load_reference", "stats64"]

STATS_SUFFIX = ".npz"
CACHE_FORMAT = "demar-reference-features-v1"


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


def stats64(stats: dict[str, Any]) -> dict[str, np.ndarray]:
    """FID statistics ``{"mu", "sigma"}`` as float64 arrays."""
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


def check_reference(path: Path, reference_key: str = "evaluate.reference") -> None:
    """A :class:`demar.images.MissingFileError` unless ``path`` is a folder or an ``.npz`` file."""
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
        images = as_image_dataset(reference, "reference")
        make_images, ref_digest = (lambda: images), (lambda: image_set_digest(images))
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
                    out.fid_stats = stats64({"mu": npz["mu"], "sigma": npz["sigma"]})
                fid_layer = None  # FID uses the stored statistics, not the stored images
            if fid_layer is not None or feature_layers:
                if "arr_0" not in keys:
                    need = "mu and sigma" if fid_layer is not None else "the images arr_0 (KID, precision/recall)"
                    raise ValueError(f"reference statistics file {path} lacks {need}; it holds {sorted(keys)}")
                out.num_images = _npz_array_shape(path, "arr_0")[0]
            ref_digest = functools.cache(lambda: file_sha256(path))  # hashed only when the cache is used

            def make_images() -> Dataset:
                with np.load(path) as npz:
                    return ArrayImageDataset(npz["arr_0"], identity=ref_digest())
        else:
            check_reference(path, reference_key)

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
                try:
                    entry = torch_load(entries[layer])
                except (UnreadableFileError, UnsafeFileError) as err:  # a damaged cache entry is recomputed
                    print(f"ignoring the reference cache entry: {err}", file=sys.stderr)
                    continue
                if isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT:
                    cached[layer] = entry
    out.cache_paths = list(entries.values())
    out.from_cache = len(cached) == len(layers)
    if not out.from_cache:
        feats = extract(make_images())
        for layer in layers:
            if layer in cached:
                continue
            stats = stats64(fid_features_to_statistics(feats[layer]))
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
        out.fid_stats = stats64({"mu": cached[fid_layer]["mu"].numpy(), "sigma": cached[fid_layer]["sigma"].numpy()})
    return out
