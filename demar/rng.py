"""Seed derivation: every random draw of the suite is keyed by a tuple of plain values.

Training, sampling and the studies derive each generator's seed from
``(seed, purpose, step, ...)`` with :func:`derive_seed`, so a resumed or differently
parallel run makes the same draws as an uninterrupted one.
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on ``keys`` (stable across runs, processes, machines).

    Args:
        keys: e.g. ``(seed, "latents", step, slice)``.
    """
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
