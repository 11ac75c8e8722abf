"""The latent cache: posterior moments of every training image and of its mirror image.

MAR caches, for every training image, the tokenizer's posterior parameters of the
image and of its horizontal flip; training then picks one of the two at random
and draws a fresh sample from it (mar-reference.md, "Latent cache"). Here:

- :func:`extract_latents` writes ``shard_00000.pt, shard_00001.pt, ...`` (each
  ``{"moments": [n, 2, 2C, h, w], "labels": [n], "indices": [n]}``; index 0 of the
  second axis is the image, 1 its flip; mean channels first, then log-variance)
  and ``manifest.json`` (counts, shapes, dtype, sha256 per shard, the tokenizer's
  latent scale and file hash, the source data set, the digest of the extraction
  code). Every file is written atomically and the manifest is rewritten after
  each shard, so a killed run leaves only whole shards; a rerun removes the
  temporary files of killed writes, keeps the finished shards whose hash checks
  and computes the rest. A manifest from a different tokenizer, data set, setting
  or code is discarded with its shards, saying why in one line. Batches never
  straddle shards, so a resumed run writes the same bytes as an uninterrupted one.
- :class:`LatentDataset` reads them: ``ds[i] -> (moments [2, 2C, h, w], label)``,
  after checking every shard's hash once when it is opened.
- :func:`draw_latents` turns a batch of moments into scaled training tokens.
"""

from __future__ import annotations

import bisect
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from demar.config import StrictConfig
from demar.identity import code_digest
from demar.io import file_sha256, read_json, torch_load, write_json
from demar.shards import ShardsWritten, intact_shards, open_cache_folder, save_shard, shard_name
from demar.tokenizer import LOGVAR_MAX, LOGVAR_MIN, Tokenizer

__all__ = [
    "ExtractResult",
    "LatentDataset",
    "LatentError",
    "LatentsConfig",
    "draw_latents",
    "extract_latents",
    "extraction_code_digest",
    "shard_name",
]

FORMAT = "demar-latents"
VERSION = 1
# The modules whose code determines the cached moments (with all they import).
CODE_MODULES = ("demar.latents", "demar.data")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LatentsConfig(StrictConfig):
    """Latent extraction (``latents`` in params.yaml).

    Attributes:
        shard_size: images per shard file (default 4096).
        batch_size: images per encoder pass; each pass also encodes their flips (default 128).
        dtype: stored dtype of the moments, ``float32``, ``float16`` or ``bfloat16`` (default ``float32``).
        num_workers: DataLoader workers reading images (default 0).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` for the encoder (default ``"auto"``).
    """

    shard_size: int = Field(4096, ge=1)
    batch_size: int = Field(128, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


ExtractResult = ShardsWritten  # what extract_latents returns


class LatentError(ValueError):
    """A latent cache is incomplete or does not match its manifest; the message names the file."""


def _shard_batches(start: int, stop: int, batch_size: int) -> Iterator[list[int]]:
    for b in range(start, stop, batch_size):
        yield list(range(b, min(stop, b + batch_size)))


def extraction_code_digest() -> str:
    """:func:`demar.identity.code_digest` of the code that determines the moments.

    This module with the tokenizer and all they import, and the data package (how
    images are read and resized), whatever wrapper the caller puts around a data set.
    """
    return code_digest(*CODE_MODULES)


@torch.no_grad()
def extract_latents(
    tokenizer: Tokenizer,
    dataset: Dataset,
    out_dir: str | os.PathLike[str],
    cfg: LatentsConfig,
    *,
    tokenizer_sha256: str,
    num_classes: int,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Write the posterior moments of every image of ``dataset`` and of its flip to ``out_dir``.

    Args:
        tokenizer: the tokenizer (on the device to compute on; used in eval mode).
        dataset: items ``(image float [3, H, W] in [-1, 1], label, ...)``, without random flips.
        out_dir: the cache folder (created); finished shards of a matching earlier run are kept.
        cfg: shard size, batch size, dtype, workers.
        tokenizer_sha256: hash of the tokenizer file, recorded and compared on resume.
        num_classes: number of classes of the data set, recorded for the model.
        source: a JSON-able description of the data set (e.g. its manifest hash), compared on resume
            (default None).
        progress: show a tqdm bar (default True).

    Returns:
        The final manifest (also written to ``out_dir/manifest.json``, with ``"complete": true``)
        and counts of reused and written shards.
    """
    t0 = time.perf_counter()
    root = open_cache_folder(out_dir)
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    num = len(dataset)
    first = dataset[0][0]
    c, h, w = tokenizer.config.latent_shape(first.shape[-1])
    identity = {
        "format": FORMAT,
        "version": VERSION,
        "num_items": num,
        "shard_size": cfg.shard_size,
        "num_shards": (num + cfg.shard_size - 1) // cfg.shard_size,
        "moments_shape": [2, 2 * c, h, w],
        "dtype": cfg.dtype,
        "scale": tokenizer.scale,
        "tokenizer_sha256": tokenizer_sha256,
        "num_classes": num_classes,
        "source": source or {},
        "code": extraction_code_digest(),
    }
    manifest_path = root / "manifest.json"
    done: dict[int, dict[str, Any]] = {}
    if manifest_path.is_file():
        old = read_json(manifest_path)
        diffs = [k for k in identity if old.get(k) != identity[k]]
        if not diffs:
            done = intact_shards(root, old)
        else:
            tqdm.write(f"{manifest_path}: written with another {', '.join(diffs)}; starting over", file=sys.stderr)
    for stale in root.glob("shard_*.pt"):
        if not any(entry["file"] == stale.name for entry in done.values()):
            stale.unlink()

    def write_manifest(complete: bool) -> dict[str, Any]:
        manifest = {**identity, "complete": complete, "shards": [done[i] for i in sorted(done)]}
        write_json(manifest_path, manifest)
        return manifest

    reused = len(done)
    todo = [s for s in range(identity["num_shards"]) if s not in done]
    batches = [
        b for s in todo for b in _shard_batches(s * cfg.shard_size, min(num, (s + 1) * cfg.shard_size), cfg.batch_size)
    ]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers)
    bar = tqdm(
        total=num, initial=num - sum(len(b) for b in batches), desc="extract latents", unit="img", disable=not progress
    )
    store = _DTYPES[cfg.dtype]
    parts: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    shard_iter = iter(todo)
    shard = next(shard_iter, None)
    filled = 0
    for batch_ids, batch in zip(batches, loader, strict=True):
        x, y = batch[0].to(device), torch.as_tensor(batch[1])  # [B, 3, H, W], [B]
        both = torch.cat([x, x.flip(-1)])  # [2B, 3, H, W]: images, then their mirror images
        moments = tokenizer.encode_moments(both).float()  # [2B, 2C, h, w]
        moments = torch.stack(moments.chunk(2), dim=1)  # [B, 2, 2C, h, w]
        parts.append(moments.to("cpu", store))
        labels.append(y.long())
        filled += len(batch_ids)
        bar.update(len(batch_ids))
        start = shard * cfg.shard_size
        if filled == min(num, start + cfg.shard_size) - start:
            blob = {
                "moments": torch.cat(parts).contiguous(),
                "labels": torch.cat(labels).contiguous(),
                "indices": torch.arange(start, start + filled, dtype=torch.int64),
            }
            done[shard] = {
                "index": shard,
                "file": shard_name(shard),
                "start": start,
                "count": filled,
                "sha256": save_shard(blob, root / shard_name(shard)),
            }
            write_manifest(complete=False)
            parts, labels, filled = [], [], 0
            shard = next(shard_iter, None)
    bar.close()
    written = sum(len(b) for b in batches)
    return ExtractResult(write_manifest(complete=True), reused, len(todo), written, time.perf_counter() - t0)


class LatentDataset(Dataset):
    """A finished latent cache: ``ds[i] -> (moments float32 [2, 2C, h, w], label)``.

    Index 0 of the moments is the image, index 1 its horizontal flip; channels are the
    posterior mean then the log-variance (unclamped).

    Args:
        root: the cache folder (holding ``manifest.json``).
        verify: check every shard's sha256 against the manifest now, once, before any item is read
            (default True); DataLoader workers then reuse the checked files without re-reading them.

    Attributes:
        scale: the tokenizer's latent scale (tokens = latents * scale).
        num_classes: number of classes.
        moments_shape: ``(2, 2C, h, w)``.
        manifest: the manifest.
    """

    def __init__(self, root: str | os.PathLike[str], verify: bool = True) -> None:
        self.root = Path(root)
        self.manifest = read_json(self.root / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise LatentError(f"{self.root / 'manifest.json'} is not a latent cache manifest")
        if not self.manifest.get("complete"):
            raise LatentError(f"{self.root}: extraction is incomplete (rerun it; finished shards are kept)")
        self.scale = float(self.manifest["scale"])
        self.num_classes = int(self.manifest["num_classes"])
        self.moments_shape = tuple(self.manifest["moments_shape"])
        self._entries = self.manifest["shards"]
        self._starts = [int(e["start"]) for e in self._entries]
        self._len = sum(int(e["count"]) for e in self._entries)
        if self._len != self.manifest["num_items"]:
            raise LatentError(f"{self.root}: shards hold {self._len} items, manifest says {self.manifest['num_items']}")
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        for entry in self._entries:
            path = self.root / entry["file"]
            if not path.is_file():
                raise LatentError(f"latent shard missing: {path}")
            if verify and file_sha256(path) != entry["sha256"]:
                raise LatentError(f"latent shard {path}: sha256 does not match {self.root / 'manifest.json'}")

    def __len__(self) -> int:
        return self._len

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if s not in self._shards:
            path = self.root / self._entries[s]["file"]
            self._shards[s] = torch_load(path, mmap=True)
        return self._shards[s]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} latents")
        s = bisect.bisect_right(self._starts, i) - 1
        data = self._shard(s)
        j = i - self._starts[s]
        return data["moments"][j].float(), int(data["labels"][j])

    def source_indices(self) -> torch.Tensor:
        """``LongTensor [N]``: the index in the source data set of each latent's image."""
        return torch.cat([self._shard(s)["indices"].long() for s in range(len(self._entries))])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All moments ``[N, 2, 2C, h, w]`` (stored dtype) and labels ``[N]`` in memory (small caches)."""
        shards = [self._shard(s) for s in range(len(self._entries))]
        return torch.cat([d["moments"] for d in shards]), torch.cat([d["labels"] for d in shards])


def draw_latents(moments: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training tokens from cached moments: pick image or flip at random, sample, scale.

    Args:
        moments: ``[B, 2, 2C, h, w]`` (image / flip; mean then log-variance channels).
        scale: the latent scale (``LatentDataset.scale``).
        generator: draws the choice and the noise; its device is used for drawing (default None:
            the global RNG on ``moments``' device).

    Returns:
        ``[B, C, h, w]`` = ``(mean + exp(logvar / 2) * eps) * scale`` of the chosen moments,
        log-variance clamped to [-30, 20]; float32 on ``moments``' device.
    """
    b = moments.shape[0]
    draw_device = generator.device if generator is not None else moments.device
    pick = torch.randint(0, 2, (b,), generator=generator, device=draw_device).to(moments.device)  # [B]
    chosen = moments[torch.arange(b, device=moments.device), pick].float()  # [B, 2C, h, w]
    mean, logvar = chosen.chunk(2, dim=1)  # [B, C, h, w] each
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    eps = torch.randn(mean.shape, generator=generator, device=draw_device).to(moments.device)
    return (mean + torch.exp(0.5 * logvar) * eps) * scale
