"""MS-COCO captions data set: an images folder and the official ``captions_*2014.json`` annotations.

The annotation file is a JSON object with ``images`` (``[{"id", "file_name", ...}]``)
and ``annotations`` (``[{"image_id", "caption", ...}]``), as in MS-COCO's
``captions_train2014.json`` and ``captions_val2014.json``. Every caption of an
image is usable (about five); :class:`CocoDataset` draws one per image per epoch
from a generator seeded by ``(seed, epoch)``, so the draw does not depend on the
order items are read in, nor on the number of workers.

Preprocessing follows U-ViT's MS-COCO pipeline (the Table 3 peers): centre-crop
the short side into a square, resize it to the resolution with a high-quality
filter (``lanczos`` or ``bicubic``, a param), scale to [-1, 1]. No flips.

As for image folders (:mod:`demar.data.folder`), bad images are decided once at
scan time: :func:`scan` decodes every listed image; one that is missing or
unreadable stops the scan (``on_bad_image: fail``, the error names the file) or
is left out and reported (``skip``). Images without a caption are left out too,
counted apart. The outcome is written as a fixed index (:func:`write_index`).
An annotation file that does not parse is an error naming the file and the
line and column, or the key at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from demar.config import StrictConfig
from demar.data.folder import BadImageError, load_image
from demar.images import to_unit
from demar.io import read_json, write_json
from demar.rng import derive_seed

__all__ = [
    "CocoConfig",
    "CocoDataset",
    "CocoFormatError",
    "CocoImage",
    "CocoImages",
    "CocoScan",
    "CocoSplit",
    "center_crop_resize",
    "open_prepared",
    "read_annotations",
    "read_index",
    "scan",
    "write_index",
]

INDEX_FORMAT = "demar-coco-index"
INDEX_VERSION = 1
FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}


class CocoSplit(StrictConfig):
    """One split of MS-COCO.

    Attributes:
        images: the folder of the split's images (e.g. ``train2014/``).
        annotations: its captions file (e.g. ``annotations/captions_train2014.json``).
    """

    images: str
    annotations: str


class CocoConfig(StrictConfig):
    """MS-COCO with captions.

    Attributes:
        train: the training split (train2014).
        val: the evaluation split (val2014), whose captions condition the samples and whose
            images give the reference statistics (default None).
        resolution: output side in pixels (default 256).
        resize_filter: ``"lanczos"`` or ``"bicubic"``, the filter of the resize after the centre
            crop (default ``"lanczos"``, U-ViT's).
        on_bad_image: ``"skip"`` (report and leave out) or ``"fail"`` (stop) on an image listed in
            the annotations but missing or unreadable (default ``"skip"``).
        workers: threads decoding images during the scan (default 8).
    """

    train: CocoSplit
    val: CocoSplit | None = None
    resolution: int = Field(256, ge=8)
    resize_filter: Literal["lanczos", "bicubic"] = "lanczos"
    on_bad_image: Literal["skip", "fail"] = "skip"
    workers: int = Field(8, ge=1)


class CocoFormatError(ValueError):
    """An annotation file does not parse or lacks a key; the message names the file and the line or key."""


@dataclass(frozen=True)
class CocoImage:
    """An image and all its captions (in annotation-file order).

    Attributes:
        id: the image id of the annotations.
        file_name: its file, relative to the images folder.
        captions: its captions, stripped of surrounding white space.
    """

    id: int
    file_name: str
    captions: tuple[str, ...]


@dataclass
class CocoScan:
    """The outcome of :func:`scan`.

    Attributes:
        images_root: the images folder.
        annotations: the annotation file.
        annotations_sha256: its hash (identifies the split's content).
        samples: the good, captioned images, sorted by id.
        skipped: ``(file name, error)`` of every listed image left out as bad.
        uncaptioned: number of listed images without any caption (left out).
    """

    images_root: Path
    annotations: Path
    annotations_sha256: str
    samples: list[CocoImage]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    uncaptioned: int = 0


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    """``obj[key]``, checked to be of ``kind``; a :class:`CocoFormatError` naming ``where.key`` otherwise."""
    if not isinstance(obj, dict):
        raise CocoFormatError(f"{path}: {where} must be an object, not {type(obj).__name__}")
    if key not in obj:
        raise CocoFormatError(f"{path}: {where} has no key '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CocoFormatError(f"{path}: {where}.{key} must be {names}, not {type(value).__name__} {value!r:.60}")
    return value


def read_annotations(path: str | os.PathLike[str]) -> tuple[list[CocoImage], int]:
    """Parse an MS-COCO captions file into images with their captions.

    Args:
        path: the annotation file.

    Returns:
        The captioned images sorted by id, and the number of listed images without a caption.

    Raises:
        FileNotFoundError: there is no such file.
        CocoFormatError: invalid JSON (the message gives line and column) or a missing, mistyped or
            inconsistent key (the message names it, e.g. ``annotations[12].image_id``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{path}: not UTF-8 text at byte {err.start}") from None
    images = _require(data, "images", list, "<top>", path)
    annotations = _require(data, "annotations", list, "<top>", path)
    files: dict[int, str] = {}
    for i, im in enumerate(images):
        image_id = _require(im, "id", int, f"images[{i}]", path)
        file_name = _require(im, "file_name", str, f"images[{i}]", path)
        if image_id in files:
            raise CocoFormatError(f"{path}: images[{i}].id {image_id} is listed twice")
        files[image_id] = file_name
    captions: dict[int, list[str]] = {}
    for j, ann in enumerate(annotations):
        image_id = _require(ann, "image_id", int, f"annotations[{j}]", path)
        text = _require(ann, "caption", str, f"annotations[{j}]", path)
        if image_id not in files:
            raise CocoFormatError(f"{path}: annotations[{j}].image_id {image_id} is not the id of any listed image")
        captions.setdefault(image_id, []).append(text.strip())
    found = [CocoImage(i, files[i], tuple(captions[i])) for i in sorted(files) if i in captions]
    return found, len(files) - len(found)


def scan(
    split: CocoSplit,
    *,
    on_bad_image: Literal["skip", "fail"] = "skip",
    workers: int = 8,
    key: str = "data.coco.on_bad_image",
    progress: bool = True,
) -> CocoScan:
    """Read a split's annotations and fully decode every listed image; decide here which are bad.

    Args:
        split: the images folder and annotation file.
        on_bad_image: ``"skip"`` leaves missing or unreadable images out (reported in ``skipped``);
            ``"fail"`` raises (default ``"skip"``).
        workers: decoding threads (default 8).
        key: the params key of ``on_bad_image``, quoted in the error (default ``"data.coco.on_bad_image"``).
        progress: show a tqdm bar (default True).

    Raises:
        FileNotFoundError: the images folder or the annotation file is missing.
        CocoFormatError: the annotation file does not parse (see :func:`read_annotations`).
        BadImageError: with ``on_bad_image="fail"``, at the first bad image in id order.
    """
    root, ann_path = Path(split.images), Path(split.annotations)
    if not root.is_dir():
        raise FileNotFoundError(f"MS-COCO images folder not found: {root}")
    images, uncaptioned = read_annotations(ann_path)

    def check(image: CocoImage) -> str | None:
        try:
            load_image(root / image.file_name)
        except BadImageError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(tqdm(pool.map(check, images), total=len(images), desc=f"scan {root.name}", disable=not progress))
    samples, skipped = [], []
    for image, error in zip(images, errors, strict=True):
        if error is None:
            samples.append(image)
        elif on_bad_image == "fail":
            raise BadImageError(f"{error} (listed in {ann_path}; {key} is 'fail')")
        else:
            skipped.append((image.file_name, error))
    digest = hashlib.sha256(ann_path.read_bytes()).hexdigest()
    return CocoScan(root, ann_path, digest, samples, skipped, uncaptioned)


def write_index(
    path: str | os.PathLike[str],
    result: CocoScan,
    *,
    resolution: int | None = None,
    resize_filter: Literal["lanczos", "bicubic"] | None = None,
) -> None:
    """Write a scan's outcome as a JSON index (folders, the annotations' hash, images with captions, skips).

    ``resolution`` and ``resize_filter``, when given, record how the split's images are
    prepared, so that the folder of the index opens as those images (:func:`open_prepared`).
    """
    write_json(
        path,
        {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "resolution": resolution,
            "resize_filter": resize_filter,
            "images_root": str(result.images_root),
            "annotations": str(result.annotations),
            "annotations_sha256": result.annotations_sha256,
            "images": [{"id": s.id, "file_name": s.file_name, "captions": list(s.captions)} for s in result.samples],
            "skipped": [{"file_name": f, "error": e} for f, e in result.skipped],
            "uncaptioned": result.uncaptioned,
        },
    )


def read_index(path: str | os.PathLike[str]) -> CocoScan:
    """Read an index written by :func:`write_index`."""
    data = read_json(path)
    if data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not an MS-COCO index")
    samples = [CocoImage(int(s["id"]), s["file_name"], tuple(s["captions"])) for s in data["images"]]
    skipped = [(s["file_name"], s["error"]) for s in data["skipped"]]
    return CocoScan(
        Path(data["images_root"]),
        Path(data["annotations"]),
        data["annotations_sha256"],
        samples,
        skipped,
        int(data["uncaptioned"]),
    )


def center_crop_resize(image: Image.Image, size: int, resize_filter: Literal["lanczos", "bicubic"]) -> Image.Image:
    """Crop the centred square of side ``min(W, H)``, then resize it to ``size x size`` with ``resize_filter``."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), resample=FILTERS[resize_filter])


class CocoDataset(Dataset):
    """Images of a scan with one caption each: ``ds[i] -> (image float32 [3, R, R] in [-1, 1], caption id)``.

    Caption ids index :attr:`captions`, the flat list of every image's captions in image
    order (the order of a caption cache written from it). The caption of each image is
    drawn anew per epoch (:meth:`set_epoch`), uniformly among that image's captions.

    Args:
        scan_result: the fixed sample list (from :func:`scan` or :func:`read_index`).
        resolution: output side ``R`` (default 256).
        resize_filter: the resize filter (default ``"lanczos"``).
        seed: seeds the caption draw with the epoch (default 0).

    Attributes:
        captions: every caption, image by image; ``offsets[i]:offsets[i + 1]`` are image ``i``'s.
        skipped: the scan's left-out files.
    """

    def __init__(
        self,
        scan_result: CocoScan,
        resolution: int = 256,
        resize_filter: Literal["lanczos", "bicubic"] = "lanczos",
        seed: int = 0,
    ) -> None:
        self.root = scan_result.images_root
        self.samples = scan_result.samples
        self.skipped = scan_result.skipped
        self.resolution = resolution
        self.resize_filter = resize_filter
        self.seed = seed
        self.captions = [c for s in self.samples for c in s.captions]
        counts = torch.tensor([len(s.captions) for s in self.samples], dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])  # [N + 1]
        self._counts = counts
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.samples)

    def caption_draw(self, epoch: int) -> torch.Tensor:
        """The caption id of every image for ``epoch``: int64 ``[N]``, from a generator seeded by (seed, epoch)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "coco_captions", epoch))
        u = torch.rand(len(self.samples), generator=g, dtype=torch.float64)  # [N]
        pick = (u * self._counts).long().clamp(max=self._counts - 1)  # uniform among each image's captions
        return self.offsets[:-1] + pick

    def set_epoch(self, epoch: int) -> None:
        """Draw the captions of ``epoch`` (call before each epoch; workers copy the draw when they start)."""
        self.epoch = epoch
        self._drawn = self.caption_draw(epoch)

    def path(self, i: int) -> Path:
        """The file of item ``i``."""
        return self.root / self.samples[i].file_name

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = load_image(self.path(i))
        except BadImageError as err:
            raise BadImageError(f"{err} (it passed the scan: rerun the data stage)") from None
        arr = np.asarray(center_crop_resize(image, self.resolution, self.resize_filter))  # uint8 [R, R, 3]
        x = to_unit(torch.from_numpy(arr.copy()).permute(2, 0, 1))  # [3, R, R] in [-1, 1]
        return x, int(self._drawn[i])


class CocoImages(Dataset):
    """The images of a scan, prepared, in id order: ``ds[i] -> (image, 0)`` (one class; no caption draw).

    What latent extraction, reference statistics and :func:`demar.data.open_split` read.

    Args:
        scan_result: the fixed sample list.
        resolution: output side ``R``.
        resize_filter: the resize filter.
        output: ``"float"`` for float32 ``[3, R, R]`` in [-1, 1], ``"uint8"`` for uint8 (default ``"float"``).

    Attributes:
        labels: int64 zeros ``[N]``; ``classes`` is ``["image"]``, ``num_classes`` 1.
    """

    classes = ["image"]
    num_classes = 1

    def __init__(
        self,
        scan_result: CocoScan,
        resolution: int = 256,
        resize_filter: Literal["lanczos", "bicubic"] = "lanczos",
        output: Literal["uint8", "float"] = "float",
    ) -> None:
        self.root = scan_result.images_root
        self.samples = scan_result.samples
        self.resolution = resolution
        self.resize_filter = resize_filter
        self.output = output
        self.labels = np.zeros(len(self.samples), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.samples[i].file_name
        try:
            image = load_image(path)
        except BadImageError as err:
            raise BadImageError(f"{err} (it passed the scan: rerun the data stage)") from None
        arr = np.asarray(center_crop_resize(image, self.resolution, self.resize_filter))  # uint8 [R, R, 3]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, R, R]
        return (to_unit(x) if self.output == "float" else x), 0


def open_prepared(root: str | os.PathLike[str], output: Literal["uint8", "float"] = "float") -> CocoImages | None:
    """The images of a prepared MS-COCO split folder (an ``index.json`` with its preprocessing), or None.

    None when ``root`` holds no MS-COCO index or one written without ``resolution``.
    """
    path = Path(root) / "index.json"
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT or data.get("resolution") is None:
        return None
    return CocoImages(read_index(path), int(data["resolution"]), data["resize_filter"], output=output)
