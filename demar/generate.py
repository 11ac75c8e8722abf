"""Sampling images to disk: class-balanced, resumable, with a manifest, a grid and timing.

:func:`generate` draws ``num_images`` class-conditional images from a model and
writes them to one folder:

- ``00000.png``, ``00001.png``, ... (or ``shard_00000.npy``, ... uint8 ``[B, H, W, 3]``
  arrays, one per batch, with ``image_format: shards``);
- ``manifest.json``: every image's file (and index in its shard), label and, for a
  text-conditioned run, caption; the
  generation config and sampler settings, the seed, the sha256 of the model and
  tokenizer weights (and of their files when given), and one record per batch;
- ``grid.png``: a preview, one column per class (evenly spaced over the classes);
- ``timing.json``: seconds per image and images per second of sampling + decoding.

Labels are class-balanced in a fixed order: image ``i`` has class ``i mod C``, so
every class has ``num_images / C`` images and every batch mixes the classes. A
text-conditioned model draws image ``i`` from prompt ``i`` of a :class:`Prompts` set
(caption states, texts and the classes they name) instead.

Batch ``b`` covers images ``[b * batch_size, (b + 1) * batch_size)`` and draws all
its randomness from its own ``torch.Generator`` seeded from ``(seed, b)``, so a
batch's images do not depend on which batches ran before it. A killed run
resumes: a batch whose images are all listed in the manifest and present on disk
is skipped, the others are sampled again, and the folder ends up byte-identical to
an uninterrupted run (on the same kind of device). Every file is written
atomically (:mod:`demar.io`); the manifest is rewritten after each batch.

Timing counts the model's sampling loop and the tokenizer's decoder (not PNG
encoding or disk writes), with the device synchronised around them. The first
batch a process computes is a warm-up (kernels, allocator, caches): its images are
kept but its time is not counted; if a process has a single batch to compute and
nothing was timed before, that batch is first run once as a discarded warm-up.
Skipped (resumed) batches are never timed; batches timed by an earlier process
that was killed count, as recorded in the manifest.

A folder is resumed only when its recorded identity matches: the config, the
weights, and :func:`demar.identity.code_digest` of the code that turns them into
pixels (:data:`IMAGE_CODE`). Otherwise every image is drawn again: with
``on_mismatch="restart"`` the old files are removed first (one line says why), so
old and new images are never mixed.

:class:`demar.images.GeneratedImages` reads the images back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from demar.config import StrictConfig
from demar.identity import code_digest
from demar.captions import Prompts
from demar.images import SAMPLES_FORMAT, SAMPLES_MANIFEST, GeneratedImages, make_grid, tile_in_order, to_uint8
from demar.io import atomic_write_bytes, file_sha256, read_json, remove_stale_temporaries, write_json
from demar.model import decode_tokens
from demar.rng import derive_seed
from demar.sampler import SampleSettings
from demar.tracking import flatten

if TYPE_CHECKING:
    from demar.model import DeMAR
    from demar.tokenizer import Tokenizer
    from demar.tracking import RunLogger

__all__ = [
    "IMAGE_CODE",
    "GenerateConfig",
    "GenerateMismatchError",
    "GenerateResult",
    "SampleStageConfig",
    "batch_seed",
    "class_labels",
    "generate",
    "image_code_digest",
    "weights_sha256",
]

MANIFEST = SAMPLES_MANIFEST
GRID = "grid.png"
TIMING = "timing.json"
MANIFEST_VERSION = 2  # 2: the key records the code digest
# The modules whose code determines the images, besides the config and the weights.
IMAGE_CODE = ("demar.generate", "demar.model", "demar.tokenizer")
# Files this module writes and may remove when it restarts a folder whose settings changed.
_OWNED = re.compile(r"^(\d+\.png|shard_\d+\.npy|grid\.png|timing\.json|manifest\.json)$")


class GenerateConfig(StrictConfig):
    """How many images to draw and how (the ``sample:`` section of ``params.yaml``).

    Attributes:
        num_images: images to generate; a multiple of the number of classes, so that
            every class has the same count (default 50,000, the paper's protocol).
        batch_size: images per batch; part of what the images depend on (default 64).
        seed: base seed; batch ``b`` uses a generator seeded from ``(seed, b)`` (default 0).
        sampler: the sampling knobs (:class:`demar.sampler.SampleSettings`; default its defaults).
        use_ema: sample with the EMA weights; the caller loads them (default True).
        image_format: ``"png"`` (one file per image) or ``"shards"`` (one uint8
            ``[B, H, W, 3]`` ``.npy`` array per batch) (default ``"png"``).
        grid_size: the preview grid shows up to this many classes (columns) and this
            many images per class (rows) (default 8).
        bf16: bf16 autocast of the sampling loop on a GPU; ignored on a CPU (default True).
    """

    num_images: int = Field(50_000, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = Field(0, ge=0)
    sampler: SampleSettings = Field(default_factory=SampleSettings)
    use_ema: bool = True
    image_format: Literal["png", "shards"] = "png"
    grid_size: int = Field(8, ge=1)
    bf16: bool = True

    @property
    def num_batches(self) -> int:
        """``ceil(num_images / batch_size)``."""
        return math.ceil(self.num_images / self.batch_size)


class SampleStageConfig(GenerateConfig):
    """The ``sample:`` section of ``params.yaml``: a :class:`GenerateConfig` plus the untrained set.

    The ``sample`` stage takes the seed from the row (``rows.<row>.seed``), and the
    guidance from the row when it sets one (``rows.<row>.cfg``, see
    :meth:`demar.params.Params.sample_config`).

    Attributes:
        untrained_num_images: images drawn from a freshly initialised model of the same
            config (``samples/<row>_untrained``), the floor that evaluation compares
            against; a multiple of the number of classes.
    """

    untrained_num_images: int = Field(10_000, ge=1)

    def for_run(self, seed: int, num_images: int | None = None) -> GenerateConfig:
        """The :class:`GenerateConfig` of one run of this section.

        Args:
            seed: the run's seed.
            num_images: override of ``num_images`` (default None: keep it).
        """
        data = self.model_dump(exclude={"untrained_num_images"})
        data.update(seed=seed, num_images=num_images or self.num_images)
        return GenerateConfig.model_validate(data)


class GenerateMismatchError(RuntimeError):
    """The output folder holds images generated with other settings, weights or code."""


@dataclass
class GenerateResult:
    """What :func:`generate` returns.

    Attributes:
        out_dir: the output folder.
        manifest: path of ``manifest.json``.
        grid: path of ``grid.png``.
        timing: the content of ``timing.json``.
        computed_batches: batches sampled by this call.
        skipped_batches: batches found complete and skipped (resumed run).
        labels: the label of every image, in file order.
    """

    out_dir: Path
    manifest: Path
    grid: Path
    timing: dict[str, Any]
    computed_batches: int
    skipped_batches: int
    labels: list[int] = field(default_factory=list)

    @property
    def sec_per_image(self) -> float | None:
        """Measured seconds per image (sampling + decoding), None if nothing was timed."""
        return self.timing.get("sec_per_image")


# ----------------------------------------------------------------------------- small pure helpers


def class_labels(num_images: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels in a fixed order: image ``i`` gets class ``i mod num_classes``.

    Args:
        num_images: how many labels; must be a multiple of ``num_classes``.
        num_classes: the number of classes C.

    Returns:
        ``LongTensor [num_images]``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if num_images % num_classes:
        raise ValueError(
            f"num_images={num_images} is not a multiple of the {num_classes} classes: "
            "class-balanced sampling needs the same number of images per class"
        )
    return torch.arange(num_images, dtype=torch.long) % num_classes


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``'s generator: :func:`demar.rng.derive_seed` of ``(seed, "generate", batch)``.

    Args:
        seed: the run's base seed.
        batch: the batch index.
    """
    return derive_seed(seed, "generate", batch)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, sorted by name).

    Identifies the weights actually used, e.g. EMA or not, whatever file they came from.

    Args:
        module: the module.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def image_code_digest() -> str:
    """:func:`demar.identity.code_digest` of :data:`IMAGE_CODE`: the code part of a folder's identity."""
    return code_digest(*IMAGE_CODE)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the run


class _Folder:
    """The manifest of one output folder and the bookkeeping of what is done."""

    def __init__(self, out_dir: Path, cfg: GenerateConfig, key: dict[str, Any], header: dict[str, Any],
                 on_mismatch: str) -> None:  # fmt: skip
        self.out_dir, self.cfg, self.key = out_dir, cfg, key
        self.path = out_dir / MANIFEST
        self.images: dict[int, dict[str, Any]] = {}
        self.batches: dict[int, dict[str, Any]] = {}
        if self.path.is_file():
            old = read_json(self.path)
            if old.get("key") == key:
                self.images = {int(e["image"]): e for e in old.get("images", [])}
                self.batches = {int(b["batch"]): b for b in old.get("batches", [])}
            else:
                new_flat, old_flat = flatten(key), flatten(old.get("key") or {})
                diff = sorted(k for k in set(new_flat) | set(old_flat) if new_flat.get(k) != old_flat.get(k))
                diff = ", ".join(diff) or "manifest format"
                if on_mismatch != "restart":
                    raise GenerateMismatchError(
                        f"{out_dir} holds images generated with other settings, weights or code (differing: "
                        f"{diff}); use another folder, delete it, or pass on_mismatch='restart'"
                    )
                print(f"{out_dir}: its images come from other {diff}; drawing them all afresh", file=sys.stderr)
                self._clear()
        self.header = header
        remove_stale_temporaries(out_dir)

    def _clear(self) -> None:
        for p in self.out_dir.iterdir():
            if p.is_file() and _OWNED.match(p.name):
                p.unlink()

    def batch_indices(self, b: int) -> range:
        bs = self.cfg.batch_size
        return range(b * bs, min((b + 1) * bs, self.cfg.num_images))

    def is_done(self, b: int) -> bool:
        idx = self.batch_indices(b)
        if b not in self.batches or any(i not in self.images for i in idx):
            return False
        return all((self.out_dir / self.images[i]["file"]).is_file() for i in idx)

    def save(self, complete: bool = False) -> None:
        write_json(
            self.path,
            {
                **self.header,
                "key": self.key,
                "complete": complete,
                "batches": [self.batches[b] for b in sorted(self.batches)],
                "images": [self.images[i] for i in sorted(self.images)],
            },
        )


def _timing(batches: list[dict[str, Any]], cfg: GenerateConfig, device: torch.device, skipped: int) -> dict[str, Any]:
    timed = [b for b in batches if not b["warmup"]]
    n = sum(b["images"] for b in timed)
    total = sum(b["sample_s"] + b["decode_s"] for b in timed)
    return {
        "sec_per_image": total / n if n else None,
        "images_per_s": n / total if total > 0 else None,
        "sample_sec_per_image": sum(b["sample_s"] for b in timed) / n if n else None,
        "decode_sec_per_image": sum(b["decode_s"] for b in timed) / n if n else None,
        "measured_images": n,
        "measured_batches": len(timed),
        "warmup_batches": sum(b["warmup"] for b in batches),
        "skipped_batches": skipped,
        "batch_size": cfg.batch_size,
        "device": _device_name(device),
        "devices": sorted({b["device"] for b in timed}),
        "autocast": "bf16" if cfg.bf16 and device.type == "cuda" else "none",
        "num_iter": cfg.sampler.num_iter,
        "diffusion_steps": cfg.sampler.diffusion_steps,
        "torch_threads": torch.get_num_threads(),
    }


def generate(
    model: DeMAR,
    tokenizer: Tokenizer,
    cfg: GenerateConfig,
    out_dir: str | os.PathLike[str],
    *,
    num_classes: int,
    progress: bool = True,
    run: RunLogger | None = None,
    model_file: str | os.PathLike[str] | None = None,
    tokenizer_file: str | os.PathLike[str] | None = None,
    on_mismatch: Literal["error", "restart"] = "error",
    stop_after: int | None = None,
    prompts: Prompts | None = None,
) -> GenerateResult:
    """Sample ``cfg.num_images`` class-balanced images (or one per prompt) into ``out_dir`` (resumable).

    The model and tokenizer are used where they are (device from their parameters);
    the caller loads the EMA weights when ``cfg.use_ema`` (``load_model(path, use_ema=True)``).

    Args:
        model: the class-conditional model.
        tokenizer: the tokenizer bundle whose decoder maps tokens to pixels.
        cfg: counts, seed, sampler settings, format.
        out_dir: the output folder (created; an existing run in it is resumed).
        num_classes: the number of classes C; ``cfg.num_images`` must be a multiple of it.
        progress: show a tqdm bar over the images (default True).
        run: an MLflow run to log per-batch progress and speed into (default None).
        model_file: the model's checkpoint file, hashed into the manifest (default None).
        tokenizer_file: the tokenizer's bundle file, hashed into the manifest (default None).
        on_mismatch: when ``out_dir`` holds a run with other settings or weights:
            ``"error"`` raises :class:`GenerateMismatchError`, ``"restart"`` removes its
            files and starts over (default ``"error"``).
        stop_after: stop after computing this many batches, leaving the run unfinished
            as a kill would (default None: run to the end). For tests and time budgets.
        prompts: for a text-conditioned model, the captions to draw from: image ``i``
            gets prompt ``i``, its label and caption go into the manifest (default None:
            class labels).

    Returns:
        :class:`GenerateResult` (also when stopped early; then ``grid`` and ``timing`` are
        not written and ``timing`` is empty).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if prompts is None:
        labels = class_labels(cfg.num_images, num_classes)  # [num_images]
    elif len(prompts.captions) < cfg.num_images:
        raise ValueError(f"{cfg.num_images} images asked for but only {len(prompts.captions)} prompts given")
    else:
        labels = torch.tensor(prompts.labels[: cfg.num_images], dtype=torch.long)  # [num_images]
    param = next(model.parameters())
    device = param.device
    model.eval()
    tokenizer.eval()

    # The run's identity: a folder is resumed only when all of it matches.
    key = {
        "config": cfg.model_dump(mode="json", exclude={"grid_size"}),
        "num_classes": num_classes,
        "model_weights_sha256": weights_sha256(model),
        "tokenizer_weights_sha256": weights_sha256(tokenizer),
        "model_file_sha256": file_sha256(model_file) if model_file else None,
        "tokenizer_file_sha256": file_sha256(tokenizer_file) if tokenizer_file else None,
        "tokenizer_scale": float(tokenizer.scale),
        "device_type": device.type,
        "code": image_code_digest(),
        **({"prompts": prompts.source} if prompts is not None else {}),
    }
    header = {
        "format": SAMPLES_FORMAT,
        "version": MANIFEST_VERSION,
        "image_format": cfg.image_format,
        "num_images": cfg.num_images,
        "num_classes": num_classes,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "settings": cfg.sampler.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json"),
        "model": {
            "file": str(model_file) if model_file else None,
            "file_sha256": key["model_file_sha256"],
            "weights_sha256": key["model_weights_sha256"],
            "use_ema": cfg.use_ema,
        },
        "tokenizer": {
            "file": str(tokenizer_file) if tokenizer_file else None,
            "file_sha256": key["tokenizer_file_sha256"],
            "weights_sha256": key["tokenizer_weights_sha256"],
            "scale": float(tokenizer.scale),
        },
    }
    folder = _Folder(out_dir, cfg, key, header, on_mismatch)
    todo = [b for b in range(cfg.num_batches) if not folder.is_done(b)]
    skipped = cfg.num_batches - len(todo)
    width = max(5, len(str(cfg.num_images - 1)))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else contextlib.nullcontext()
    )

    def sample_batch(b: int) -> tuple[np.ndarray, float, float]:
        idx = folder.batch_indices(b)
        if prompts is None:
            context = labels[idx.start : idx.stop].to(device)  # [B]
        else:
            context = prompts.states[idx.start : idx.stop].to(device, torch.float32)  # [B, L, C]
        gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, b))
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast:
            tokens = model.sample(context, cfg.sampler, generator=gen)  # [B, N, d]
        _sync(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            images = decode_tokens(tokens, tokenizer, model.cfg)  # [B, 3, H, W]
        _sync(device)
        t2 = time.perf_counter()
        arrays = to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [B, H, W, 3]
        return arrays, t1 - t0, t2 - t1

    # A single batch to compute, and nothing timed so far: run it once as a discarded warm-up,
    # so that the run still has a timed batch. Otherwise this process's first batch is the warm-up.
    extra_warmup = len(todo) == 1 and not any(not r["warmup"] for r in folder.batches.values())
    if extra_warmup:
        sample_batch(todo[0])
    done_images = cfg.num_images - sum(len(folder.batch_indices(b)) for b in todo)
    bar = tqdm(total=cfg.num_images, initial=done_images, unit="img", desc=f"generate {out_dir.name}",
               disable=not progress)  # fmt: skip
    computed = 0
    for n_done, b in enumerate(todo):
        if stop_after is not None and computed >= stop_after:
            bar.close()
            return GenerateResult(out_dir, folder.path, out_dir / GRID, {}, computed, skipped, labels.tolist())
        arrays, sample_s, decode_s = sample_batch(b)  # [B, H, W, 3] uint8
        idx = folder.batch_indices(b)
        if cfg.image_format == "png":
            for i, image in zip(idx, arrays):
                name = f"{i:0{width}d}.png"
                atomic_write_bytes(out_dir / name, _png_bytes(image))
                folder.images[i] = {"image": i, "file": name, "label": int(labels[i])}
                if prompts is not None:
                    folder.images[i]["caption"] = prompts.captions[i]
        else:
            name = f"shard_{b:0{width}d}.npy"
            atomic_write_bytes(out_dir / name, _npy_bytes(arrays))
            for k, i in enumerate(idx):
                folder.images[i] = {"image": i, "file": name, "index": k, "label": int(labels[i])}
                if prompts is not None:
                    folder.images[i]["caption"] = prompts.captions[i]
        warmup = n_done == 0 and not extra_warmup
        folder.batches[b] = {
            "batch": b,
            "images": len(idx),
            "sample_s": sample_s,
            "decode_s": decode_s,
            "warmup": warmup,
            "device": _device_name(device),
        }
        folder.save()
        computed += 1
        bar.update(len(idx))
        if run is not None:
            run.log_metrics(
                {"generate/images_done": idx.stop, "generate/batch_sec_per_image": (sample_s + decode_s) / len(idx)},
                step=b,
            )
    bar.close()

    timing = _timing([folder.batches[b] for b in sorted(folder.batches)], cfg, device, skipped)
    write_json(out_dir / TIMING, timing)
    drawn = GeneratedImages(out_dir, require_complete=False)
    grid = make_grid(drawn, num_classes, cfg.grid_size) if prompts is None else tile_in_order(drawn, cfg.grid_size)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out_dir / GRID, buf.getvalue())
    folder.save(complete=True)
    return GenerateResult(out_dir, folder.path, out_dir / GRID, timing, computed, skipped, labels.tolist())
