"""The embedded domain's classifier and its torch-fidelity feature extractor.

ImageNet's Inception network knows nothing of 32x32 procedural shapes, so on the
embedded data set FID, IS, precision/recall and KID are measured in the feature
space of a small CNN trained on that data set (the role Inception plays for
ImageNet). The same network gives the class accuracy of class-conditional samples:
the share of generated images classified as the class they were asked for.

* :class:`ShapeClassifier`: conv stages -> global max pool -> a
  ``feature_dim`` penultimate feature (used for FID / KID / precision-recall)
  -> class logits (used for IS and class accuracy).
* :func:`train_classifier`: a short AdamW + one-cycle schedule on in-memory tensors.
* :class:`ClassifierFeatureExtractor`: the torch-fidelity wrapper, registered
  under :data:`EXTRACTOR_NAME` when this module is imported; it loads the weights
  from torch-fidelity's ``feature_extractor_weights_path``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm.auto import tqdm

from demar.config import StrictConfig
from demar.images import to_uint8, to_unit
from demar.io import torch_load, torch_save

__all__ = [
    "EXTRACTOR_NAME",
    "ClassifierConfig",
    "ClassifierFeatureExtractor",
    "ShapeClassifier",
    "class_accuracy",
    "dataset_to_tensors",
    "load_classifier",
    "predict",
    "save_classifier",
    "train_classifier",
]

EXTRACTOR_NAME = "demar-classifier"
"""Name under which :class:`ClassifierFeatureExtractor` is registered with torch-fidelity."""

FEATURE_LAYER = "penultimate"
LOGITS_LAYER = "logits"
CHECKPOINT_FORMAT = "demar-classifier-v1"


class ClassifierConfig(StrictConfig):
    """Architecture and training recipe of the embedded-domain classifier (``params.yaml: classifier``).

    Attributes:
        num_classes: number of classes of the embedded data set (default 10).
        resolution: input side in pixels; other sizes are resized to it (default 32).
        channels: width of each conv stage; each stage halves the resolution (default (16, 32, 64)).
        convs_per_stage: 3x3 conv-BN-ReLU layers per stage, before its 2x2 max-pool (default 1).
        global_pool: ``"max"`` or ``"avg"`` pooling over positions before the feature layer;
            max suits one small shape on a plain background and learns several times faster (default ``"max"``).
        feature_dim: width of the penultimate feature used by FID / KID / PRC (default 128).
        epochs: passes over the training images (default 3).
        batch_size: training batch size (default 128).
        lr: peak learning rate of the one-cycle schedule (default 3e-3).
        weight_decay: AdamW weight decay (default 5e-4).
        label_smoothing: cross-entropy label smoothing (default 0.0).
        max_train_images: cap on the training images used, ``None`` = all (default None).
        seed: seed of initialisation and batch order (default 0).
    """

    num_classes: int = Field(10, ge=2)
    resolution: int = Field(32, ge=8)
    channels: tuple[int, ...] = Field((16, 32, 64), min_length=1)
    convs_per_stage: int = Field(1, ge=1)
    global_pool: Literal["max", "avg"] = "max"
    feature_dim: int = Field(128, ge=2)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_train_images: int | None = Field(None, ge=1)
    seed: int = 0


def dataset_to_tensors(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a labelled image data set into memory.

    Args:
        dataset: items ``(image, label, ...)`` with ``image`` ``[3, H, W]`` uint8 or
            float in [-1, 1] (e.g. the embedded data set's ``(image, label, caption)``).
        limit: keep only the first ``limit`` items; ``None`` keeps all (default None).

    Returns:
        ``(images uint8 [N, 3, H, W], labels int64 [N])``.
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images, labels = [], []
    for i in range(n):
        item = dataset[i]
        images.append(to_uint8(torch.as_tensor(item[0])))
        labels.append(int(item[1]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ShapeClassifier(nn.Module):
    """A small CNN: conv stages -> global pool -> penultimate feature -> logits.

    Args:
        cfg: the architecture (:class:`ClassifierConfig`); stored on the module so
            checkpoints rebuild it.
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 3
        for c in cfg.channels:
            for j in range(cfg.convs_per_stage):
                layers.append(_conv_bn_relu(c_in if j == 0 else c, c))
            layers.append(nn.MaxPool2d(2))  # halves the resolution
            c_in = c
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c_in, cfg.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (or float in [-1, 1]) -> float in [-1, 1] at ``cfg.resolution``."""
        x = to_unit(images) if images.dtype == torch.uint8 else images.float()
        r = self.cfg.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x.contiguous(memory_format=torch.channels_last)  # faster convolutions on CPU

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature of prepared images ``[B, 3, r, r]`` -> ``[B, feature_dim]``."""
        h = self.body(x)  # [B, C, r / 2^S, r / 2^S]
        h = h.amax(dim=(2, 3)) if self.cfg.global_pool == "max" else h.mean(dim=(2, 3))  # [B, C]
        return self.embed(h)  # [B, feature_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of prepared images ``[B, 3, r, r]`` -> ``[B, num_classes]``."""
        return self.head(self.features(x))


def save_classifier(path: str | os.PathLike[str], model: ShapeClassifier, extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint holding the config and weights (atomically).

    Args:
        path: destination file.
        model: the classifier.
        extra: JSON-like metadata stored beside it, e.g. its accuracy (default None).
    """
    torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": model.cfg.model_dump(mode="json"),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra": extra or {},
        },
        path,
    )


def load_classifier(path: str | os.PathLike[str] | None, map_location: str | torch.device = "cpu") -> ShapeClassifier:
    """Rebuild a classifier from :func:`save_classifier`'s file, in eval mode.

    Args:
        path: the checkpoint; a missing file is a ``FileNotFoundError`` that says how to make it.
        map_location: device to load onto (default ``"cpu"``).
    """
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"classifier weights not found: {path}. Train them with the train_classifier stage "
            "(`dvc repro train_classifier`, written to classifier.weights_path) and name the file "
            "in params.yaml under evaluate.weights_path."
        )
    ckpt = torch_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    model = ShapeClassifier(ClassifierConfig.model_validate(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def train_classifier(
    cfg: ClassifierConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    progress: bool = True,
) -> ShapeClassifier:
    """Train a :class:`ShapeClassifier` on in-memory images.

    AdamW with a one-cycle learning-rate schedule (peak ``cfg.lr``) for ``cfg.epochs``
    epochs; batch order and initialisation come from ``torch.Generator``s seeded
    with ``cfg.seed``. Runs on the device of ``images``.

    Args:
        cfg: architecture and recipe.
        images: uint8 ``[N, 3, H, W]`` (or float in [-1, 1]).
        labels: int64 ``[N]`` in ``[0, cfg.num_classes)``.
        progress: show a tqdm bar (default True).

    Returns:
        The trained classifier in eval mode.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"labels must lie in [0, {cfg.num_classes}) (classifier.num_classes)")
    if cfg.max_train_images is not None:
        images, labels = images[: cfg.max_train_images], labels[: cfg.max_train_images]
    device = images.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # parameter initialisation only
        model = ShapeClassifier(cfg).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    steps_per_epoch = -(-n // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="train classifier", disable=not progress)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            logits = model(model.prepare(images[idx]))  # [b, num_classes]
            loss = F.cross_entropy(logits, labels[idx].to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(classifier: ShapeClassifier, images: torch.Tensor | Dataset, *, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes ``[N]`` of images.

    Args:
        classifier: the classifier (its device is used).
        images: uint8 ``[N, 3, H, W]`` (or float in [-1, 1]), or a Dataset of such
            ``[3, H, W]`` tensors (or of tuples starting with one).
        batch_size: images per forward pass; affects speed only (default 512).
    """
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    out = []
    n = len(images)
    for start in range(0, n, batch_size):
        if isinstance(images, torch.Tensor):
            batch = images[start : start + batch_size]
        else:
            items = [images[i] for i in range(start, min(n, start + batch_size))]
            batch = torch.stack([torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items])
        logits = classifier(classifier.prepare(to_uint8(batch).to(device)))  # [b, num_classes]
        out.append(logits.argmax(dim=1).cpu())
    classifier.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def class_accuracy(
    images: torch.Tensor | Dataset,
    requested_labels: torch.Tensor | Sequence[int],
    classifier: ShapeClassifier,
    *,
    batch_size: int = 512,
) -> float:
    """Share of images that ``classifier`` assigns to the class they were requested as.

    Args:
        images: generated images, uint8 ``[N, 3, H, W]`` or a Dataset of ``[3, H, W]`` tensors.
        requested_labels: the class each image was sampled for, ``[N]``.
        classifier: the embedded-domain classifier.
        batch_size: images per forward pass (default 512).
    """
    labels = torch.as_tensor(requested_labels, dtype=torch.long)
    if len(images) != labels.numel():
        raise ValueError(f"{len(images)} images but {labels.numel()} requested labels")
    if labels.numel() == 0:
        raise ValueError("class_accuracy needs at least one image")
    pred = predict(classifier, images, batch_size=batch_size)
    return float((pred == labels).float().mean())


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a trained :class:`ShapeClassifier`.

    Provides ``"penultimate"`` (``[B, feature_dim]``, default for FID, KID and
    precision/recall) and ``"logits"`` (``[B, num_classes]``, default for IS).

    Args:
        name: the registered name (:data:`EXTRACTOR_NAME`).
        features_list: the requested feature names.
        feature_extractor_weights_path: the classifier checkpoint (required: nothing is downloaded).
        **kwargs: torch-fidelity's other options, ignored.
    """

    def __init__(
        self,
        name: str,
        features_list: Sequence[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, list(features_list))
        self.classifier = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 ``[B, 3, H, W]`` -> the requested features, in ``features_list`` order."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        h = self.classifier.features(self.classifier.prepare(x))  # [B, feature_dim]
        out = {FEATURE_LAYER: h.float()}
        if LOGITS_LAYER in self.features_list:
            out[LOGITS_LAYER] = self.classifier.head(h).float()  # [B, num_classes]
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURE_LAYER, LOGITS_LAYER)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": LOGITS_LAYER, "fid": FEATURE_LAYER, "kid": FEATURE_LAYER, "prc": FEATURE_LAYER}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return True

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)
