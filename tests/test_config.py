from __future__ import annotations

import pytest
from pydantic import Field

from demar.config import ConfigError, StrictConfig, load_section, validate
from demar.io import read_json, write_json


class Inner(StrictConfig):
    lr: float = Field(1e-4, gt=0)


class Outer(StrictConfig):
    name: str = "x"
    inner: Inner = Inner()


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("sec:\n  name: a\n  inner:\n    lr: 0.1\n    lrr: 2\n")
    with pytest.raises(ConfigError) as err:
        load_section(p, "sec", Outer)
    msg = str(err.value)
    assert str(p) in msg and "sec.inner.lrr" in msg and "unknown key" in msg


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.inner\.lr.*greater than 0"):
        validate(Outer, {"inner": {"lr": -1.0}}, source="params.yaml", prefix="train")


def test_missing_section(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("other: {}\n")
    with pytest.raises(ConfigError, match="missing section 'sec'"):
        load_section(p, "sec", Outer)


def test_frozen_and_defaults():
    cfg = validate(Outer, {"name": "b"})
    assert cfg.inner.lr == 1e-4
    with pytest.raises(Exception):
        cfg.name = "c"  # type: ignore[misc]


def test_write_json_is_atomic_and_round_trips(tmp_path):
    p = tmp_path / "m.json"
    write_json(p, {"b": 1, "a": [1.5]})
    assert read_json(p) == {"a": [1.5], "b": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]
