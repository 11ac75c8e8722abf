"""Typed, validated configuration.

Every component of the suite reads its hyperparameters from one section of
``params.yaml`` into a frozen pydantic model derived from :class:`StrictConfig`.
Unknown keys, wrong types and out-of-range values are errors that name the file
and the dotted key at fault, raised before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "StrictConfig",
    "load_section",
    "load_yaml",
    "validate",
]

C = TypeVar("C", bound="StrictConfig")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names it."""


class StrictConfig(BaseModel):
    """Base of every config object: frozen, no unknown keys, no silent coercion of strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


def _format_errors(err: ValidationError, source: str, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        value = e.get("input")
        shown = "" if e["type"] == "missing" else f" (got {value!r})"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}{shown}")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def validate(cls: type[C], data: Any, *, source: str = "<params>", prefix: str = "") -> C:
    """Build ``cls`` from ``data`` or raise :class:`ConfigError`.

    Args:
        cls: the config model to build.
        data: a mapping (usually a section of ``params.yaml``).
        source: the file the data came from, quoted in errors (default ``"<params>"``).
        prefix: the dotted key of ``data`` inside that file, quoted in errors (default ``""``).
    """
    if data is None:
        data = {}
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, prefix)) from None


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with an error naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at its top level, not {type(data).__name__}")
    return data


def load_section(path: str | os.PathLike[str], key: str, cls: type[C]) -> C:
    """Validate the section ``key`` (dotted for nested sections) of a YAML file into ``cls``.

    Args:
        path: the YAML file, usually ``params.yaml``.
        key: the section's dotted key, e.g. ``"tokenizer"`` or ``"rows.demar"``.
        cls: the config model of that section.
    """
    data: Any = load_yaml(path)
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{path}: missing section {key!r} (no key {part!r})")
        data = data[part]
    return validate(cls, data, source=str(path), prefix=key)
