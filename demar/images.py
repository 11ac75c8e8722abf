"""Pixels and image folders: the one [-1, 1] <-> uint8 conversion and the readers of image sets.

Models and tokenizers work on float images in [-1, 1]; files, metrics and previews on
uint8. :func:`to_uint8` and :func:`to_unit` are the only conversions between the two,
so every stage rounds the same way. The readers give uint8 ``[3, H, W]`` tensors, the
input torch-fidelity takes: a folder of image files (:class:`ImageFolderDataset`), an
array (:class:`ArrayImageDataset`), any data set of images (:class:`UInt8ImageDataset`)
and a samples folder written by :func:`demar.generate.generate` (:class:`GeneratedImages`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from demar.io import file_sha256, read_json

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLES_FORMAT",
    "SAMPLES_MANIFEST",
    "ArrayImageDataset",
    "CorruptImageError",
    "GeneratedImages",
    "ImageFolderDataset",
    "MissingFileError",
    "UInt8ImageDataset",
    "list_images",
    "make_grid",
    "tile_in_order",
    "to_uint8",
    "to_unit",
    "validate_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SAMPLES_MANIFEST = "manifest.json"
SAMPLES_FORMAT = "demar-samples"  # manifest format of demar.generate's sample folders


class CorruptImageError(ValueError):
    """An image file cannot be read; the message names the file(s)."""


class MissingFileError(FileNotFoundError):
    """A file the evaluation needs is absent; the message says where it belongs."""


# ----------------------------------------------------------------------------- pixel conversion


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255] (rounded, clipped), same shape and device.

    uint8 input is returned unchanged; any float dtype is computed in float32.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], same shape and device."""
    return images.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- image files


def list_images(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files (png, jpg, jpeg) under ``root``, sorted; ``recursive`` also searches sub-folders."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def validate_images(files: Sequence[Path]) -> tuple[int, int]:
    """Check that every file opens as an image and all share one size; returns ``(width, height)``.

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
            every image under ``root``.
        validate: open every file once now, so a corrupt file is an error naming it
            before any feature is extracted.
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
            h.update(name.encode() + b"\0" + file_sha256(p).encode())
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
        image = to_uint8(torch.as_tensor(image))
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


# ----------------------------------------------------------------------------- sample folders


class GeneratedImages(Dataset):
    """The images of a samples folder, in manifest order, as ``(uint8 [3, H, W], label)``.

    Reads both formats of :func:`demar.generate.generate` (png files or ``.npy`` shards);
    :func:`demar.metrics.compute_metrics` takes it directly (it uses the first element
    of each item). Pass it, not the folder, which also holds ``grid.png``.

    Args:
        out_dir: the folder holding ``manifest.json``.
        require_complete: refuse a run that has not finished, whose images are a
            class-unbalanced prefix.

    Attributes:
        manifest: the parsed ``manifest.json`` (settings, seed, hashes, ...).
        labels: the label of every image, in order.
    """

    def __init__(self, out_dir: str | os.PathLike[str], require_complete: bool = True) -> None:
        self.root = Path(out_dir)
        manifest = read_json(self.root / SAMPLES_MANIFEST)
        if manifest.get("format") != SAMPLES_FORMAT:
            raise ValueError(f"{self.root / SAMPLES_MANIFEST} is not a {SAMPLES_FORMAT!r} manifest")
        if require_complete and not manifest.get("complete"):
            raise ValueError(
                f"{self.root} holds an unfinished run ({len(manifest['images'])} of {manifest['num_images']} "
                "images): run generate again to finish it"
            )
        self.manifest = manifest
        self.entries: list[dict[str, Any]] = manifest["images"]
        self.labels = [int(e["label"]) for e in self.entries]
        self._shards: dict[str, np.ndarray] = {}
        missing = sorted({e["file"] for e in self.entries if not (self.root / e["file"]).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} file(s) listed in {self.root / SAMPLES_MANIFEST} are missing, e.g. {missing[0]}"
            )

    def __len__(self) -> int:
        return len(self.entries)

    def _array(self, i: int) -> np.ndarray:
        entry = self.entries[i]
        path = self.root / entry["file"]
        if "index" in entry:  # shards: memory-map each file once
            if entry["file"] not in self._shards:
                self._shards[entry["file"]] = np.load(path, mmap_mode="r", allow_pickle=False)
            return np.asarray(self._shards[entry["file"]][entry["index"]])  # [H, W, 3]
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))  # [H, W, 3]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self._array(i), copy=True)).permute(2, 0, 1)  # [3, H, W]
        return image, self.labels[i]

    def digest(self) -> str:
        """sha256 over the manifest's image list (files, labels) and the files' sizes."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(
                f"{e['file']}|{e.get('index', '')}|{e['label']}|{(self.root / e['file']).stat().st_size}\n".encode()
            )
        return h.hexdigest()


def tile_in_order(images: GeneratedImages, grid_size: int, pad: int = 2) -> Image.Image:
    """A preview of the first ``grid_size`` x ``grid_size`` images in file order (row by row).

    For text-conditioned runs, whose images follow their prompts rather than the classes.
    """
    count = min(len(images), grid_size * grid_size)
    cols = min(grid_size, count)
    rows = math.ceil(count / cols)
    first, _ = images[0]
    _, h, w = first.shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(count):
        image, _ = images[i]
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        canvas[y : y + h, x : x + w] = image.permute(1, 2, 0).numpy()
    return Image.fromarray(canvas)


def make_grid(images: GeneratedImages, num_classes: int, grid_size: int, pad: int = 2) -> Image.Image:
    """A preview: one column per class (up to ``grid_size`` classes, evenly spaced), one row per draw.

    Args:
        images: the generated images (labels ``i mod num_classes``).
        num_classes: the number of classes C.
        grid_size: at most this many columns (classes) and rows (images per class).
        pad: white pixels between cells.
    """
    cols = min(grid_size, num_classes)
    classes = sorted({round(j * num_classes / cols) for j in range(cols)})
    rows = min(grid_size, len(images) // num_classes)
    first, _ = images[0]
    _, h, w = first.shape
    canvas = np.full((rows * (h + pad) + pad, len(classes) * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for j, c in enumerate(classes):
            image, label = images[r * num_classes + c]
            assert label == c, f"image {r * num_classes + c} has label {label}, expected {c}"
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = image.permute(1, 2, 0).numpy()
    return Image.fromarray(canvas)
