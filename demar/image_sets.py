"""Which images a folder, file or data set holds, and their content identity.

:func:`open_images` turns a folder into a Dataset of uint8 ``[3, H, W]`` images, whatever
wrote it: an embedded data set split, a samples folder of :func:`demar.generate.generate`
or plain image files. The identity (:func:`reference_identity`) keys the reference cache
of :mod:`demar.reference_stats`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from demar.data.coco import INDEX_FORMAT as COCO_FORMAT
from demar.data.coco import open_prepared as open_prepared_coco
from demar.data.embedded import FORMAT as EMBEDDED_FORMAT
from demar.data.embedded import EmbeddedDataset
from demar.images import (
    SAMPLES_FORMAT,
    ArrayImageDataset,
    GeneratedImages,
    ImageFolderDataset,
    MissingFileError,
    UInt8ImageDataset,
)
from demar.io import file_sha256, read_json

__all__ = ["as_image_dataset", "image_set_digest", "open_embedded_split", "open_images", "reference_identity"]


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
    * a prepared MS-COCO split (``index.json`` of the data stage): its images, centre-cropped
      and resized as the index records;
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
    coco = open_prepared_coco(root, output="uint8")
    if coco is not None:  # identity: the index (annotations' hash, image list, preprocessing)
        identity = hashlib.sha256(f"{COCO_FORMAT}|{file_sha256(root / 'index.json')}".encode()).hexdigest()
        return UInt8ImageDataset(coco, identity=identity)
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
        return UInt8ImageDataset(GeneratedImages(root, require_complete=False))
    return ImageFolderDataset(root, validate=validate)


def reference_identity(reference: str | os.PathLike[str] | Dataset) -> str:
    """Content digest of a reference (what the statistics cache keys on besides the weights).

    Args:
        reference: a folder (see :func:`open_images`), an ``.npz`` statistics file, or a Dataset.
    """
    if isinstance(reference, Dataset):
        return image_set_digest(as_image_dataset(reference, "reference"))
    path = Path(reference)
    if path.is_file():
        return file_sha256(path)
    return image_set_digest(open_images(path, validate=False))


def as_image_dataset(images: str | os.PathLike[str] | Dataset, what: str) -> Dataset:
    """``images`` (a folder, see :func:`open_images`, or a Dataset) as a non-empty Dataset of uint8 images."""
    if isinstance(images, Dataset):
        ds = images if isinstance(images, (ImageFolderDataset, ArrayImageDataset)) else UInt8ImageDataset(images)
        if len(ds) == 0:
            raise ValueError(f"the {what} data set is empty")
        return ds
    path = Path(images)
    if not path.is_dir():
        raise MissingFileError(f"{what} image folder not found: {path}")
    return open_images(path)


def image_set_digest(ds: Dataset) -> str:
    """The content identity of a Dataset of images: its own ``digest()``, else a hash over every image."""
    return ds.digest() if hasattr(ds, "digest") else UInt8ImageDataset(ds).digest()
