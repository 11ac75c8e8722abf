"""The caption cache: the token states of every caption, computed once, so training never runs the encoder.

- :func:`encode_captions` writes ``shard_00000.pt, shard_00001.pt, ...`` (each
  ``{"states": [n, L, C], "mask": [n, L] bool, "indices": [n], "captions": [n str]}``),
  ``null.pt`` (``{"states": [L, C], "mask": [L]}``, the encoding of the empty
  caption: the null context of classifier-free guidance) and ``manifest.json``
  (counts, shapes, dtype, sha256 per file, the encoder's identity and folder, the
  hash of the caption list, the source, and :func:`demar.identity.code_digest` of
  this module).
  As for the latent cache (:mod:`demar.latents`): every file is written atomically,
  the manifest is rewritten after each shard, a rerun removes the temporaries of
  killed writes and keeps the finished shards whose hash checks, and batches never
  straddle shards, so a resumed run writes the same bytes as an uninterrupted one.
  A manifest of another encoder, caption list, setting or code is discarded with
  its shards, saying why in one line.
- :class:`CaptionCache` reads a finished cache: ``cache[i] -> (states [L, C], mask [L])``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from demar.config import StrictConfig
from demar.identity import code_digest
from demar.io import file_sha256, read_json, torch_load, write_json
from demar.shards import ShardsWritten, entry_intact, intact_shards, open_cache_folder, save_shard, shard_name
from demar.text_encoders import TextEncoder, TextEncoderConfig

__all__ = [
    "CaptionCache",
    "CaptionCacheError",
    "CaptionsConfig",
    "CaptionsStageConfig",
    "Prompts",
    "EncodeResult",
    "captions_code_digest",
    "captions_sha256",
    "encode_captions",
    "shard_name",
]

FORMAT = "demar-captions"
VERSION = 1
NULL_FILE = "null.pt"
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CaptionsConfig(StrictConfig):
    """Caption encoding.

    Attributes:
        shard_size: captions per shard file (default 8192).
        batch_size: captions per encoder pass (default 256).
        dtype: stored dtype of the states, ``float16`` or ``float32`` (default ``float16``).
    """

    shard_size: int = Field(8192, ge=1)
    batch_size: int = Field(256, ge=1)
    dtype: Literal["float16", "float32"] = "float16"


class CaptionsStageConfig(CaptionsConfig):
    """The ``captions`` section of params.yaml: the text encoder and the cache's layout.

    Attributes:
        encoder: the text encoder (:class:`demar.text_encoders.TextEncoderConfig`).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"`` (default ``"auto"``).
    """

    encoder: TextEncoderConfig = TextEncoderConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"


EncodeResult = ShardsWritten  # what encode_captions returns


class CaptionCacheError(ValueError):
    """A caption cache is incomplete or does not match its manifest; the message names the file."""


def captions_code_digest() -> str:
    """:func:`demar.identity.code_digest` of this module and the encoders it imports."""
    return code_digest("demar.captions")


def captions_sha256(captions: Sequence[str]) -> str:
    """sha256 of the caption list (as UTF-8 JSON): identifies what a cache holds, in order."""
    return hashlib.sha256(json.dumps(list(captions), ensure_ascii=False).encode("utf-8")).hexdigest()


@torch.no_grad()
def encode_captions(
    encoder: TextEncoder,
    captions: Sequence[str],
    out_dir: str | os.PathLike[str],
    cfg: CaptionsConfig,
    *,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> EncodeResult:
    """Write the token states of every caption of ``captions`` (and of the empty caption) to ``out_dir``.

    Args:
        encoder: the frozen text encoder (on the device to compute on).
        captions: the captions; item ``i`` of the cache is ``captions[i]``.
        out_dir: the cache folder (created); finished shards of a matching earlier run are kept.
        cfg: shard size, batch size, dtype.
        source: a JSON-able description of where the captions come from (e.g. an annotation
            file's hash), compared on resume (default None).
        progress: show a tqdm bar (default True).

    Returns:
        The final manifest (also written to ``out_dir/manifest.json``, with ``"complete": true``)
        and counts of reused and written shards.
    """
    t0 = time.perf_counter()
    root = open_cache_folder(out_dir)
    num = len(captions)
    identity = {
        "format": FORMAT,
        "version": VERSION,
        "num_items": num,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "num_shards": (num + cfg.shard_size - 1) // cfg.shard_size,
        "states_shape": [encoder.max_length, encoder.width],
        "dtype": cfg.dtype,
        "encoder": encoder.identity(),
        "captions_sha256": captions_sha256(captions),
        "source": source or {},
        "code": captions_code_digest(),
    }
    manifest_path = root / "manifest.json"
    done: dict[int, dict[str, Any]] = {}
    null_entry: dict[str, Any] | None = None
    if manifest_path.is_file():
        old = read_json(manifest_path)
        diffs = [k for k in identity if old.get(k) != identity[k]]
        if not diffs:
            done = intact_shards(root, old)
            null_entry = old.get("null") if entry_intact(root, old.get("null")) else None
        else:
            tqdm.write(f"{manifest_path}: written with another {', '.join(diffs)}; starting over", file=sys.stderr)
    for stale in root.glob("shard_*.pt"):
        if not any(entry["file"] == stale.name for entry in done.values()):
            stale.unlink()

    def write_manifest(complete: bool) -> dict[str, Any]:
        manifest = {
            **identity,
            "encoder_source": encoder.source,  # for the reader; not compared on resume
            "complete": complete,
            "null": null_entry,
            "shards": [done[i] for i in sorted(done)],
        }
        write_json(manifest_path, manifest)
        return manifest

    store = _DTYPES[cfg.dtype]
    if null_entry is None:
        states, mask = encoder.null()  # [L, C], [L]
        blob = {"states": states.to("cpu", store).contiguous(), "mask": mask.cpu().contiguous()}
        null_entry = {"file": NULL_FILE, "sha256": save_shard(blob, root / NULL_FILE)}
        write_manifest(complete=False)

    reused = len(done)
    todo = [s for s in range(identity["num_shards"]) if s not in done]
    bar = tqdm(
        total=num,
        initial=num - sum(min(num, (s + 1) * cfg.shard_size) - s * cfg.shard_size for s in todo),
        desc="encode captions",
        unit="caption",
        disable=not progress,
    )
    written = 0
    for shard in todo:
        start, stop = shard * cfg.shard_size, min(num, (shard + 1) * cfg.shard_size)
        parts, masks = [], []
        for b in range(start, stop, cfg.batch_size):  # batches never straddle shards
            batch = list(captions[b : min(stop, b + cfg.batch_size)])
            states, mask = encoder.encode(batch)  # [B, L, C], [B, L]
            parts.append(states.to("cpu", store))
            masks.append(mask.cpu())
            bar.update(len(batch))
        blob = {
            "states": torch.cat(parts).contiguous(),
            "mask": torch.cat(masks).contiguous(),
            "indices": torch.arange(start, stop, dtype=torch.int64),
            "captions": list(captions[start:stop]),
        }
        done[shard] = {
            "index": shard,
            "file": shard_name(shard),
            "start": start,
            "count": stop - start,
            "sha256": save_shard(blob, root / shard_name(shard)),
        }
        write_manifest(complete=False)
        written += stop - start
    bar.close()
    return EncodeResult(write_manifest(complete=True), reused, len(todo), written, time.perf_counter() - t0)


@dataclass
class Prompts:
    """Caption contexts of a text-conditioned run: image ``i`` is drawn from prompt ``i``.

    Attributes:
        states: the caption token states ``[n, L, C]`` (n at least the images drawn).
        captions: the caption text of each prompt.
        labels: the class each prompt names (scored by the class accuracy), or -1.
        source: what identifies the prompt set (e.g. the caption cache's manifest hash);
            part of the run's identity.
    """

    states: torch.Tensor
    captions: list[str]
    labels: list[int]
    source: str

    def __post_init__(self) -> None:
        if not len(self.states) == len(self.captions) == len(self.labels):
            raise ValueError(
                f"prompts: {len(self.states)} states, {len(self.captions)} captions, {len(self.labels)} labels"
            )


class CaptionCache:
    """A finished caption cache: ``cache[i] -> (states float32 [L, C], mask bool [L])`` of caption ``i``.

    Args:
        root: the cache folder (holding ``manifest.json``).
        verify: check every file's sha256 against the manifest now, once (default True).

    Attributes:
        states_shape: ``(L, C)``.
        encoder: the encoder's identity (kind, source, weights digest...).
        manifest: the manifest.
    """

    def __init__(self, root: str | os.PathLike[str], verify: bool = True) -> None:
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        self.manifest = read_json(manifest_path)
        if self.manifest.get("format") != FORMAT:
            raise CaptionCacheError(f"{manifest_path} is not a caption cache manifest")
        if not self.manifest.get("complete"):
            raise CaptionCacheError(f"{self.root}: caption encoding is incomplete (rerun it; finished shards are kept)")
        self.states_shape = tuple(self.manifest["states_shape"])
        self.encoder = self.manifest["encoder"]
        self._entries = self.manifest["shards"]
        self._starts = [int(e["start"]) for e in self._entries]
        self._len = sum(int(e["count"]) for e in self._entries)
        if self._len != self.manifest["num_items"]:
            raise CaptionCacheError(
                f"{self.root}: shards hold {self._len} captions, manifest says {self.manifest['num_items']}"
            )
        for entry in [self.manifest["null"], *self._entries]:
            path = self.root / entry["file"]
            if not path.is_file():
                raise CaptionCacheError(f"caption cache file missing: {path}")
            if verify and file_sha256(path) != entry["sha256"]:
                raise CaptionCacheError(f"caption cache file {path}: sha256 does not match {manifest_path}")
        self._shards: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self._len

    def _shard(self, s: int) -> dict[str, Any]:
        if s not in self._shards:
            self._shards[s] = torch_load(self.root / self._entries[s]["file"], mmap=True)
        return self._shards[s]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} captions")
        s = bisect.bisect_right(self._starts, i) - 1
        data, j = self._shard(s), i - self._starts[s]
        return data["states"][j].float(), data["mask"][j]

    def caption(self, i: int) -> str:
        """The text of caption ``i``."""
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} captions")
        s = bisect.bisect_right(self._starts, i) - 1
        return self._shard(s)["captions"][i - self._starts[s]]

    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoding of the empty caption (the null context): float32 ``[L, C]`` and bool ``[L]``."""
        data = torch_load(self.root / self.manifest["null"]["file"])
        return data["states"].float(), data["mask"]

    def prompts(self, indices: Sequence[int], labels: Sequence[int], draw: str = "") -> Prompts:
        """Captions ``indices`` as :class:`Prompts` (states in the stored dtype), caption ``indices[k]`` naming ``labels[k]``.

        Args:
            indices: the caption of each prompt.
            labels: the class each prompt names, or -1.
            draw: how ``indices`` were chosen, part of the prompts' identity (default "").

        Raises:
            IndexError: an index is outside the cache.
        """
        states = torch.stack([self._states(i) for i in indices]) if len(indices) else torch.empty(0)
        captions = [self.caption(i) for i in indices]
        source = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()
        return Prompts(states, captions, [int(x) for x in labels], source=f"{self.root.name}:{source}{draw}")

    def _states(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} captions")
        s = bisect.bisect_right(self._starts, i) - 1
        return self._shard(s)["states"][i - self._starts[s]]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All states ``[N, L, C]`` (stored dtype) and masks ``[N, L]`` in memory (small caches)."""
        shards = [self._shard(s) for s in range(len(self._entries))]
        return torch.cat([d["states"] for d in shards]), torch.cat([d["mask"] for d in shards])
