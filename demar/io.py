"""Crash-safe file input and output.

Everything the suite writes goes through a temporary file beside the target and a
rename, so a reader never sees a half-written file; a kill leaves at most a
temporary ``.<name>.<pid>.<random>.tmp``, which :func:`remove_stale_temporaries`
clears when a stage starts again. Torch files are read with :func:`torch_load`
only: tensors and plain values (``weights_only=True``), never code, and every
error names the file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)

__all__ = [
    "UnreadableFileError",
    "UnsafeFileError",
    "atomic_write_bytes",
    "atomic_write_text",
    "ensure_writable",
    "file_sha256",
    "read_json",
    "remove_stale_temporaries",
    "torch_load",
    "torch_save",
    "write_json",
]

TMP_SUFFIX = ".tmp"


class UnreadableFileError(ValueError):
    """A file is truncated, corrupt or not of the expected kind; the message names it.

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {reason}")


class UnsafeFileError(ValueError):
    """A torch file holds pickled objects other than tensors and plain values; it is refused unread.

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        super().__init__(
            f"{path}: refused, it holds objects other than tensors and plain values ({reason}); "
            "nothing in it was run. Delete the file if you did not make it"
        )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Raises:
        OSError: the folder is not writable or the disk is full; the message names ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write ({err.strerror or err})", str(path)) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, with an error naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically: a reader never sees a half-written file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """Read a :func:`torch_save` file: tensors and plain values only (``weights_only=True``).

    Raises:
        FileNotFoundError: there is no such file.
        UnsafeFileError: the file holds other pickled objects (it could run code); nothing is run.
        UnreadableFileError: the file is truncated, corrupt or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "torch file not found", str(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = str(err)
        if text.startswith("Weights only load failed"):
            # torch's message: boilerplate, then the refused object on a line of its own
            lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
            raise UnsafeFileError(path, lines[0] if lines else "weights_only refused it") from None
        first = text.splitlines()[0] if text else "unpickling failed"
        raise UnreadableFileError(path, f"not a readable torch file ({first})") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, text file, empty file...: say which file
        first = str(err).splitlines()[0] if str(err) else ""
        raise UnreadableFileError(
            path, f"not a readable torch file, truncated or corrupt ({type(err).__name__}: {first})"
        ) from None


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writers left under ``folder``; return them.

    A temporary of :func:`atomic_write_bytes` (``.<name>.<pid>.<random>.tmp``) is stale
    when the process that made it is gone; those of live processes (this one included)
    are kept, so a concurrent writer is never disturbed. Call it when a stage starts.
    """
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for path in sorted(root.rglob(f".*{TMP_SUFFIX}")):
        if not path.is_file() or path.is_symlink():
            continue
        parts = path.name[1 : -len(TMP_SUFFIX)].rsplit(".", 2)  # name, pid, random
        if len(parts) == 3 and parts[1].isdigit() and _alive(int(parts[1])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def ensure_writable(*folders: str | os.PathLike[str]) -> None:
    """Check that files can be written in ``folders`` (and their subfolders), creating nothing.

    A folder that does not exist yet must be creatable: its nearest existing
    ancestor must be a writable folder. Stages call this before any work, so a
    read-only output is found at the start, not after hours of training.

    Raises:
        PermissionError: a folder (named) cannot be created or written to.
    """
    for folder in folders:
        root = Path(folder)
        existing = root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise PermissionError(errno.ENOTDIR, f"output folder cannot be created, {existing} is a file", str(root))
        subfolders = sorted(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()) if existing == root else []
        for sub in [existing, *subfolders]:
            try:
                with tempfile.TemporaryFile(dir=sub):
                    pass
            except OSError as err:
                raise PermissionError(err.errno, f"output folder is not writable ({err.strerror})", str(sub)) from None


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes, read in ``chunk``-byte pieces (default 4 MiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
