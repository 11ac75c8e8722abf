"""Typed, validated configuration.

Every component of the suite reads its hyperparameters from one section of
``params.yaml`` into a frozen pydantic model derived from :class:`StrictConfig`.
Unknown keys, wrong types and out-of-range values are errors that name the file
and the dotted key at fault, raised before any work starts.

:func:`validate` (the road of every params file) parses strictly, as JSON would
be: no string becomes a number or a boolean and no boolean a number, while an
integer is a valid float and a list a valid tuple (YAML has no tuples).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_jsonable_python

__all__ = [
    "ConfigError",
    "StrictConfig",
    "load_yaml",
    "validate",
]

C = TypeVar("C", bound="StrictConfig")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names it."""


class StrictConfig(BaseModel):
    """Base of every config object: frozen, no unknown keys; :func:`validate` parses it strictly."""

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
    """Build ``cls`` from ``data`` strictly or raise :class:`ConfigError`.

    ``data`` is validated as JSON with pydantic's strict mode: ``'3'`` is not an
    integer, ``'yes'`` not a boolean, ``true`` not an integer; ``3`` is a valid
    float and ``[1, 2]`` a valid tuple.

    Args:
        cls: the config model to build.
        data: a mapping (usually a section of ``params.yaml``).
        source: the file the data came from, quoted in errors (default ``"<params>"``).
        prefix: the dotted key of ``data`` inside that file, quoted in errors (default ``""``).
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    try:
        text = json.dumps(to_jsonable_python(data))
    except (TypeError, ValueError) as err:  # a value JSON cannot hold (YAML dates, sets, objects)
        raise ConfigError(f"invalid configuration in {source}:\n  {prefix or '<top>'}: {err}") from None
    try:
        return cls.model_validate_json(text, strict=True)
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
