"""Sharded caches on disk: shard files with a sha256 each, listed in a manifest.

The latent cache and the caption cache write their tensors in shards of a fixed
number of items; a shard whose file still matches its recorded hash is kept when a
killed run starts again, so only the missing shards are computed.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from demar.io import atomic_write_bytes, file_sha256, remove_stale_temporaries

__all__ = ["ShardsWritten", "entry_intact", "intact_shards", "open_cache_folder", "save_shard", "shard_name"]


@dataclass
class ShardsWritten:
    """What writing a sharded cache did.

    Attributes:
        manifest: the final manifest (as written).
        reused_shards: shards of an earlier run kept as they were.
        written_shards: shards computed by this call.
        written_items: items computed by this call.
        wall_s: seconds this call took.
    """

    manifest: dict[str, Any]
    reused_shards: int
    written_shards: int
    written_items: int
    wall_s: float


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard_00000.pt``."""
    return f"shard_{index:05d}.pt"


def open_cache_folder(out_dir: str | os.PathLike[str]) -> Path:
    """Create the cache folder ``out_dir`` if needed and remove what killed writes left in it."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_temporaries(root):
        print(f"removed {path}, left by a killed write", file=sys.stderr)
    return root


def save_shard(blob: dict[str, Any], path: Path) -> str:
    """Write ``blob`` (tensors and plain values) atomically with ``torch.save``; return the sha256 of its bytes."""
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def entry_intact(root: Path, entry: dict[str, Any] | None) -> bool:
    """Whether the manifest ``entry``'s file exists under ``root`` with the recorded hash."""
    return entry is not None and (root / entry["file"]).is_file() and file_sha256(root / entry["file"]) == entry["sha256"]


def intact_shards(root: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The manifest's shard entries (by index) whose file exists with the recorded hash."""
    return {int(e["index"]): e for e in manifest.get("shards", []) if entry_intact(root, e)}
