"""Data sets: the embedded shapes (default), ImageNet-style folders and MS-COCO with captions.

:class:`DataConfig` is the ``data`` section of params.yaml. :func:`prepare` is the
data stage (generate the shapes, or scan and index an image folder);
:func:`open_split` opens a prepared split as a Dataset of ``(image in [-1, 1], label, ...)``
items without random flips, as latent extraction and evaluation need.

Layout of a prepared data folder (``data/<kind>/``): ``manifest.json`` and one
sub-folder per split (``train/``, ``reference/``); an embedded split holds the
arrays written by :func:`demar.data.embedded.write_split`, an image folder split
an ``index.json`` written by :func:`demar.data.folder.write_index`, an MS-COCO split
(``train`` from train2014, ``reference`` from val2014) the ``index.json`` of
:func:`demar.data.coco.write_index` with its images' preprocessing.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import model_validator
from torch.utils.data import Dataset

from demar.config import ConfigError, StrictConfig
from demar.data import coco
from demar.data.coco import CocoConfig, CocoImages
from demar.data.embedded import SHAPES, EmbeddedConfig, EmbeddedDataset, write_split
from demar.data.folder import FolderConfig, FolderDataset, class_folders, read_index, scan, write_index
from demar.io import read_json, write_json

__all__ = ["SPLITS", "DataConfig", "check_classes", "open_split", "prepare", "split_captions", "split_fingerprint"]

SPLITS = ("train", "reference")


class DataConfig(StrictConfig):
    """The ``data`` section of params.yaml.

    Attributes:
        kind: ``"embedded"`` (procedural shapes, the default), ``"imagenet"`` (an image folder)
            or ``"coco"`` (MS-COCO images with their caption annotations).
        embedded: the shapes data set (default: :class:`EmbeddedConfig` defaults).
        imagenet: the image folder; required when ``kind`` is ``"imagenet"`` (default None).
        coco: MS-COCO; required when ``kind`` is ``"coco"`` (default None).
    """

    kind: Literal["embedded", "imagenet", "coco"] = "embedded"
    embedded: EmbeddedConfig = EmbeddedConfig()
    imagenet: FolderConfig | None = None
    coco: CocoConfig | None = None

    @model_validator(mode="after")
    def _folder_given(self) -> DataConfig:
        if self.kind == "imagenet" and self.imagenet is None:
            raise ValueError("data.kind is 'imagenet' but data.imagenet (root, ...) is not set")
        if self.kind == "coco" and self.coco is None:
            raise ValueError("data.kind is 'coco' but data.coco (train: {images, annotations}, ...) is not set")
        return self

    @property
    def resolution(self) -> int:
        """The image side of the selected data set."""
        return {"embedded": self.embedded, "imagenet": self.imagenet, "coco": self.coco}[self.kind].resolution


def check_classes(cfg: DataConfig, num_classes: int) -> None:
    """Fail before any work if the data set has more classes than the model embeds (``model.num_classes``).

    A label past the class embedding would only fail at the first training step.
    For a folder, its class sub-folders are listed (no image is decoded); an empty
    one is an error naming it.
    """
    if cfg.kind == "embedded":
        found, where = len(SHAPES), "data.kind 'embedded' (its shapes)"
    elif cfg.kind == "coco":
        found, where = 1, "data.kind 'coco' (one class: captions condition it)"
    else:
        found = len(class_folders(cfg.imagenet.root, cfg.imagenet.extensions))
        where = f"data.imagenet.root {cfg.imagenet.root}"
    if found > num_classes:
        raise ConfigError(
            f"invalid configuration:\n  model.num_classes: {num_classes}, but {where} has {found} classes; "
            f"set model.num_classes to {found} or more"
        )


def prepare(cfg: DataConfig, out_dir: str | os.PathLike[str], *, progress: bool = True) -> dict[str, Any]:
    """The data stage: write the splits of ``cfg.kind`` under ``out_dir``; return its metrics.

    Args:
        cfg: the data config.
        out_dir: the prepared data folder (``train/``, ``reference/``, ``manifest.json``).
        progress: show tqdm bars (default True).

    Returns:
        ``{"kind", "resolution", "num_classes", "num_train", "num_reference", "num_skipped",
        "num_reference_skipped", "wall_s"}`` (the skip counts are 0 for the embedded data).
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {
        "kind": cfg.kind,
        "resolution": cfg.resolution,
        "num_skipped": 0,
        "num_reference_skipped": 0,
    }
    if cfg.kind == "embedded":
        for split in SPLITS:
            manifest = write_split(cfg.embedded, split, out / split, progress=progress)
            metrics[f"num_{split}"] = manifest["num_images"]
        metrics["num_classes"] = len(manifest["classes"])
    elif cfg.kind == "coco":
        metrics.update(_prepare_coco(cfg.coco, out, progress))
    else:
        folder = cfg.imagenet
        roots = {"train": folder.root, "reference": folder.reference_root}
        classes = None
        for split, root in roots.items():
            if root is None:
                metrics[f"num_{split}"] = 0
                continue
            result = scan(
                root,
                on_bad_image=folder.on_bad_image,
                extensions=folder.extensions,
                workers=folder.workers,
                classes=classes,
                progress=progress,
            )
            for path, error in result.skipped:
                print(f"skipped bad image {Path(root) / path}: {error}")
            write_index(out / split / "index.json", result)
            classes = result.classes
            metrics[f"num_{split}"] = len(result.samples)
            metrics["num_skipped" if split == "train" else "num_reference_skipped"] = len(result.skipped)
        metrics["num_classes"] = len(classes)
    metrics["wall_s"] = time.perf_counter() - t0
    write_json(
        out / "manifest.json",
        {
            "kind": cfg.kind,
            "config": cfg.model_dump(mode="json"),
            **{k: v for k, v in metrics.items() if k != "wall_s"},
        },
    )
    return metrics


def _prepare_coco(cfg: CocoConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Scan train2014 into ``train/`` and val2014 (when given) into ``reference/``; their counts."""
    metrics: dict[str, Any] = {"num_classes": 1, "num_reference": 0, "num_uncaptioned": 0}
    for split, source in (("train", cfg.train), ("reference", cfg.val)):
        if source is None:
            continue
        result = coco.scan(source, on_bad_image=cfg.on_bad_image, workers=cfg.workers, progress=progress)
        for path, error in result.skipped:
            print(f"skipped bad image {Path(source.images) / path}: {error}")
        coco.write_index(out / split / "index.json", result, resolution=cfg.resolution, resize_filter=cfg.resize_filter)
        metrics[f"num_{split}"] = len(result.samples)
        metrics["num_skipped" if split == "train" else "num_reference_skipped"] = len(result.skipped)
        metrics["num_uncaptioned"] += result.uncaptioned
    return metrics


def split_captions(cfg: DataConfig, data_dir: str | os.PathLike[str], split: str) -> tuple[list[str], list[list[int]]]:
    """Every caption of a prepared split, and for each image the indices of its captions.

    The embedded shapes have one caption per image (``captions.json``); an MS-COCO image
    has all its annotated captions (about five), in annotation-file order.

    Raises:
        ConfigError: the data set has no captions (``data.kind`` is named).
    """
    if cfg.kind == "coco":
        images = coco.read_index(Path(data_dir) / split / "index.json").samples
        captions = [c for image in images for c in image.captions]
        bounds = np.cumsum([0] + [len(image.captions) for image in images]).tolist()
        return captions, [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if cfg.kind != "embedded":
        raise ConfigError(
            f"invalid configuration:\n  data.kind: {cfg.kind!r} has no captions; a text-conditioned model "
            "(model.context: text) needs a captioned data set (embedded or coco)"
        )
    captions = read_json(Path(data_dir) / split / "captions.json")
    return captions, [[i] for i in range(len(captions))]


def open_split(cfg: DataConfig, data_dir: str | os.PathLike[str], split: str = "train") -> Dataset:
    """A prepared split as a Dataset of ``(image float [3, R, R] in [-1, 1], label, ...)``, no flips.

    The returned object has ``num_classes`` and ``classes`` attributes.

    Args:
        cfg: the data config (selects the kind and, for folders, the resolution).
        data_dir: the prepared data folder.
        split: ``"train"`` or ``"reference"`` (default ``"train"``).
    """
    root = Path(data_dir) / split
    if cfg.kind == "embedded":
        return EmbeddedDataset(root, output="float")
    if cfg.kind == "coco":
        return CocoImages(coco.read_index(root / "index.json"), cfg.coco.resolution, cfg.coco.resize_filter)
    return FolderDataset(read_index(root / "index.json"), resolution=cfg.imagenet.resolution)


def split_fingerprint(data_dir: str | os.PathLike[str], split: str = "train") -> dict[str, str]:
    """``{"split", "sha256"}``: the hash of a prepared split's manifest or index (identifies its content).

    Args:
        data_dir: the prepared data folder.
        split: the split (default ``"train"``).
    """
    root = Path(data_dir) / split
    path = root / "manifest.json" if (root / "manifest.json").is_file() else root / "index.json"
    return {"split": split, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
