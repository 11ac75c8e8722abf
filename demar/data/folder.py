"""ImageNet-style folder data set: ``root/<class>/<image>``, MAR's preprocessing.

- Classes are the sorted sub-folder names; label ``i`` is ``classes[i]``. Images are
  the files with an image extension under each class folder (recursively), sorted.
- Preprocessing is ADM's center crop as used by MAR: while the short side is at
  least twice the target, halve the image with a box filter; resize bicubically so
  the short side equals the target; crop the center square. Then an optional
  random horizontal flip (from an explicit generator; off for latent extraction,
  which computes the flip itself) and scaling to [-1, 1].

Bad images are decided at scan time. :func:`scan` fully decodes every file once;
an unreadable or truncated file either stops the scan (``on_bad_image: fail``,
the error names the file) or is left out of the sample list and reported with its
path and error (``skip``). The sample list (an index, written to disk by the data
stage) is then fixed: indices always refer to it, so a skip can never shift them
later. A file that fails at load time although it passed the scan (changed on
disk since) is always an error naming the file, never a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from demar.config import ConfigError, StrictConfig
from demar.images import to_unit
from demar.io import read_json, write_json

__all__ = [
    "BadImageError",
    "FolderConfig",
    "FolderDataset",
    "ScanResult",
    "center_crop_adm",
    "class_folders",
    "load_image",
    "read_index",
    "scan",
    "write_index",
]

INDEX_FORMAT = "demar-image-folder-index"
INDEX_VERSION = 1


class FolderConfig(StrictConfig):
    """An image folder data set (``data.imagenet`` in params.yaml).

    Attributes:
        root: the training folder, one sub-folder per class.
        reference_root: an optional held-out folder with the same classes (default None).
        resolution: output side in pixels (default 256).
        on_bad_image: ``"skip"`` (report and leave out) or ``"fail"`` (stop) on an unreadable
            or truncated image (default ``"skip"``).
        extensions: file name endings counted as images, case-insensitive
            (default ``(".jpeg", ".jpg", ".png", ".bmp", ".webp")``).
        workers: threads decoding images during the scan (default 8).
    """

    root: str
    reference_root: str | None = None
    resolution: int = Field(256, ge=8)
    on_bad_image: Literal["skip", "fail"] = "skip"
    extensions: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
    workers: int = Field(8, ge=1)


class BadImageError(RuntimeError):
    """An image file cannot be decoded; the message names the file."""


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file fully into RGB.

    Args:
        path: the file.

    Raises:
        BadImageError: unreadable, truncated or not an image (the message names ``path``).
    """
    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: truncated data fails here, not later
            return im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadImageError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop (used by MAR): box-halve, bicubic resize, center crop to ``size x size``.

    Args:
        image: an RGB image.
        size: the output side.
    """
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass
class ScanResult:
    """The outcome of :func:`scan`.

    Attributes:
        root: the scanned folder.
        classes: sorted class names.
        samples: ``(path relative to root, label)`` of every good image, sorted.
        skipped: ``(path relative to root, error)`` of every image left out.
    """

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _is_image(path: Path, exts: tuple[str, ...]) -> bool:
    return path.is_file() and path.name.lower().endswith(exts)


def class_folders(
    root: str | os.PathLike[str], extensions: Iterable[str] = FolderConfig.model_fields["extensions"].default
) -> list[str]:
    """The sorted class names of ``root``, found without decoding any image.

    Raises:
        FileNotFoundError: ``root`` is missing or has no sub-folder.
        ConfigError: a class folder holds no image file (it would be a class no image shows).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders")
    for name in classes:
        if not any(_is_image(p, exts) for p in (root / name).rglob("*")):
            raise ConfigError(
                f"class folder {root / name} holds no image ({', '.join(exts)}): add images or remove the folder"
            )
    return classes


def _list_files(root: Path, extensions: Iterable[str]) -> tuple[list[str], list[tuple[str, int]]]:
    classes = class_folders(root, extensions)
    exts = tuple(e.lower() for e in extensions)
    files = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if _is_image(p, exts))
        files += [(p.relative_to(root).as_posix(), label) for p in found]
    return classes, files


def scan(
    root: str | os.PathLike[str],
    *,
    on_bad_image: Literal["skip", "fail"] = "skip",
    extensions: Iterable[str] = FolderConfig.model_fields["extensions"].default,
    workers: int = 8,
    classes: list[str] | None = None,
    progress: bool = True,
) -> ScanResult:
    """List and fully decode every image of ``root``; decide here which images are bad.

    Args:
        root: the folder, one sub-folder per class.
        on_bad_image: ``"skip"`` leaves bad images out (reported in ``skipped``); ``"fail"`` raises
            (default ``"skip"``).
        extensions: file endings counted as images (default: :class:`FolderConfig`'s).
        workers: decoding threads (default 8).
        classes: the expected class list, e.g. the training set's for a reference folder; an error
            if the folder's differ (default None: no check).
        progress: show a tqdm bar (default True).

    Raises:
        BadImageError: with ``on_bad_image="fail"``, at the first bad image in sorted order.
    """
    root = Path(root)
    found_classes, files = _list_files(root, extensions)
    if classes is not None and found_classes != list(classes):
        raise ValueError(f"{root}: class folders differ from the expected {len(classes)} classes")

    def check(item: tuple[str, int]) -> str | None:
        try:
            load_image(root / item[0])
        except BadImageError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(tqdm(pool.map(check, files), total=len(files), desc=f"scan {root.name}", disable=not progress))
    samples, skipped = [], []
    for item, error in zip(files, errors, strict=True):
        if error is None:
            samples.append(item)
        elif on_bad_image == "fail":
            raise BadImageError(f"{error} (data.on_bad_image is 'fail')")
        else:
            skipped.append((item[0], error))
    return ScanResult(root, found_classes, samples, skipped)


def write_index(path: str | os.PathLike[str], result: ScanResult) -> None:
    """Write a scan's outcome as a JSON index (root, classes, paths, labels, skipped).

    Args:
        path: the index file.
        result: the scan.
    """
    write_json(
        path,
        {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "root": str(result.root),
            "classes": result.classes,
            "paths": [p for p, _ in result.samples],
            "labels": [label for _, label in result.samples],
            "skipped": [{"path": p, "error": e} for p, e in result.skipped],
        },
    )


def read_index(path: str | os.PathLike[str]) -> ScanResult:
    """Read an index written by :func:`write_index`.

    Args:
        path: the index file.
    """
    data = read_json(path)
    if data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not an image folder index")
    samples = list(zip(data["paths"], data["labels"], strict=True))
    skipped = [(s["path"], s["error"]) for s in data["skipped"]]
    return ScanResult(Path(data["root"]), list(data["classes"]), samples, skipped)


class FolderDataset(Dataset):
    """The images of a scan: ``ds[i] -> (image float32 [3, R, R] in [-1, 1], label)``.

    Args:
        scan_result: the fixed sample list (from :func:`scan` or :func:`read_index`).
        resolution: output side ``R`` (default 256).
        flip_generator: draws a random horizontal flip per item (p = 0.5) when given; no flips
            when None (default None). With DataLoader workers each worker holds a copy of it.

    Attributes:
        classes: class names; ``num_classes`` their number; ``skipped`` the scan's left-out files.
    """

    def __init__(
        self, scan_result: ScanResult, resolution: int = 256, flip_generator: torch.Generator | None = None
    ) -> None:
        self.root = scan_result.root
        self.samples = scan_result.samples
        self.skipped = scan_result.skipped
        self.classes = scan_result.classes
        self.num_classes = len(self.classes)
        self.resolution = resolution
        self.flip_generator = flip_generator

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> Path:
        """The file of item ``i``."""
        return self.root / self.samples[i][0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        try:
            image = load_image(self.root / rel)
        except BadImageError as err:
            raise BadImageError(f"{err} (it passed the scan: rerun the data stage)") from None
        arr = np.asarray(center_crop_adm(image, self.resolution))  # uint8 [R, R, 3]
        x = to_unit(torch.from_numpy(arr.copy()).permute(2, 0, 1))  # [3, R, R] in [-1, 1]
        if self.flip_generator is not None and torch.rand(1, generator=self.flip_generator).item() < 0.5:
            x = x.flip(-1)
        return x, label
