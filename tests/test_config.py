from __future__ import annotations

import re

import pytest
from pydantic import Field

from demar.config import ConfigError, StrictConfig, load_yaml, validate
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
        validate(Outer, load_yaml(p)["sec"], source=str(p), prefix="sec")
    msg = str(err.value)
    assert str(p) in msg and "sec.inner.lrr" in msg and "unknown key" in msg


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.inner\.lr.*greater than 0"):
        validate(Outer, {"inner": {"lr": -1.0}}, source="params.yaml", prefix="train")


def test_missing_or_malformed_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")


class Typed(StrictConfig):
    count: int = 1
    rate: float = 0.5
    on: bool = False
    pair: tuple[float, float] = (0.1, 0.2)
    steps: tuple[int, ...] = (1,)


@pytest.mark.parametrize(
    ("data", "key"),
    [({"count": "3"}, "count"), ({"rate": "0.1"}, "rate"), ({"on": "yes"}, "on"), ({"on": 1}, "on"),
     ({"count": True}, "count"), ({"count": 3.0}, "count"), ({"steps": ["1"]}, "steps.0")],
)  # fmt: skip
def test_no_string_to_number_or_bool_and_no_bool_to_int(data, key):
    with pytest.raises(ConfigError, match=rf"\n  sec\.{re.escape(key)}: .*\(got "):
        validate(Typed, data, source="params.yaml", prefix="sec")


def test_ints_are_floats_and_lists_are_tuples():
    cfg = validate(Typed, {"rate": 2, "pair": [1, 2.5], "steps": [3, 4]})
    assert (cfg.rate, cfg.pair, cfg.steps) == (2.0, (1.0, 2.5), (3, 4)) and isinstance(cfg.rate, float)
    assert validate(Typed, cfg) is cfg  # an already validated object passes as it is


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
