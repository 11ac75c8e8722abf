"""Which config and code a study's trials were computed with.

A study is stored under ``<name>@<identity>``, where the identity hashes the parts of
the study file that change a trial's result (objective, space, fixed values, sampler,
budget), the row's resolved configs, the input files (checkpoint or latents, and the
tokenizer) and :func:`demar.identity.code_digest` of the objectives' code. After an
edit of any of them a run starts a new study instead of mixing old and new trials;
``n_trials``, the pruner and the heartbeat may change freely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from demar.identity import code_digest
from demar.io import file_sha256
from demar.studies.base import StudyBase
from demar.studies.config import StudyConfig

__all__ = ["OBJECTIVES_MODULE", "file_digest", "input_files", "storage_name", "study_identity"]

OBJECTIVES_MODULE = "demar.studies.objectives"
"""The module whose code (with everything it imports) computes a trial's values."""

FREE_KEYS = ("name", "n_trials", "pruner", "heartbeat_s", "base", "enqueue")
"""Study-file keys outside the identity (``base`` enters through the resolved configs and files;
``enqueue`` only picks points of the space, each computed as any other trial)."""


def file_digest(path: Path | None) -> str | None:
    """SHA-256 of a file, or None when there is no such file."""
    return file_sha256(path) if path is not None and path.is_file() else None


def input_files(base: StudyBase) -> dict[str, Path | None]:
    """The files a study's trials start from: tokenizer, checkpoint and the latents' manifest
    (None where the objective uses none)."""
    return {"tokenizer": base.tokenizer, "checkpoint": base.checkpoint,
            "latents": base.latents / "manifest.json" if base.latents else None}  # fmt: skip


def study_identity(cfg: StudyConfig, base: StudyBase) -> dict[str, str]:
    """``{"config": sha256, "code": sha256}`` of what computes the trials of ``cfg`` from ``base``."""
    study = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in FREE_KEYS}
    files = input_files(base)
    record = {
        "study": study,
        "row": base.row,
        "seed": base.seed,
        "configs": {k: c.model_dump(mode="json") for k, c in sorted(base.configs.items())},
        "evaluate": base.evaluate.model_dump(mode="json") if hasattr(base.evaluate, "model_dump") else str(base.evaluate),
        "files": {k: file_digest(p) for k, p in files.items()},
    }
    config = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return {"config": config, "code": code_digest(OBJECTIVES_MODULE)}


def storage_name(cfg: StudyConfig, identity: dict[str, str]) -> str:
    """The study's name in the storage: ``<name>@<12 hex digits of the identity>``."""
    digest = hashlib.sha256(f"{identity['config']}:{identity['code']}".encode()).hexdigest()
    return f"{cfg.name}@{digest[:12]}"
