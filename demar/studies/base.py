"""Where a study's trials start: the row's configs from ``params.yaml`` and the trial's overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demar.config import ConfigError, StrictConfig, validate
from demar.studies.config import StudyConfig

__all__ = ["StudyBase", "apply_overrides", "check_space", "resolve_base"]

@dataclass
class StudyBase:
    """Everything a trial starts from, resolved from ``params.yaml`` once per worker.

    Attributes:
        preset: the params preset (the MLflow experiment is ``demar-<preset>``).
        row: the row's name.
        seed: the row's seed.
        configs: ``{"model": ModelConfig, "train": TrainConfig, "sample": GenerateConfig}``
            (``sampling``: ``sample`` only) before the trial's values.
        evaluate: the ``evaluate:`` section (extractor, reference, cache).
        tokenizer: the tokenizer bundle file.
        latents: the latent set (``training``), else None.
        checkpoint: the model file (``sampling``), else None.
    """

    preset: str
    row: str
    seed: int
    configs: dict[str, StrictConfig]
    evaluate: Any
    tokenizer: Path
    latents: Path | None = None
    checkpoint: Path | None = None


def _set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if not rest:
        data[head] = value
        return
    child = data.get(head)
    data[head] = child = dict(child) if isinstance(child, dict) else {}
    _set_dotted(child, rest, value)


def apply_overrides(
    configs: Mapping[str, StrictConfig], values: Mapping[str, Any], *, source: str
) -> dict[str, StrictConfig]:
    """Configs with dotted-key values set and validated again.

    Args:
        configs: section name -> config object, e.g. ``{"model": ModelConfig(...)}``.
        values: ``"<section>.<field>[.<field>...]"`` -> value.
        source: quoted in errors (the study file).

    Raises:
        ConfigError: a key names no section or field, or a value is invalid; the
            message names the dotted key.
    """
    data = {name: cfg.model_dump() for name, cfg in configs.items()}
    for key, value in values.items():
        section, _, path = key.partition(".")
        if section not in data:
            raise ConfigError(f"invalid configuration in {source}:\n  {key}: no section {section!r} here")
        _set_dotted(data[section], path, value)
    return {name: validate(type(configs[name]), data[name], source=source, prefix=name) for name in configs}


def resolve_base(cfg: StudyConfig, *, check_files: bool = True) -> StudyBase:
    """Read ``cfg.base``: the row's configs, the evaluation settings and the files a trial needs.

    ``params.yaml`` is validated whole (:func:`demar.params.load_params`) and the configs
    are built as the ``train``, ``sample`` and ``evaluate`` stages build theirs (the
    training seed is the row's). Paths are relative to the working directory.

    Args:
        cfg: the study.
        check_files: fail if the tokenizer, latents or checkpoint is missing (default True).

    Raises:
        ConfigError: the params file, the row or a section is missing or invalid.
        FileNotFoundError: a file the objective needs is absent (with the stage that makes it).
    """
    from demar.params import load_params

    spec, source = cfg.base, cfg.base.params
    params = load_params(source)  # the whole file, validated as every stage validates it
    row = params.row(spec.row)
    configs: dict[str, StrictConfig] = {"sample": params.row_sample(spec.row)}  # the sample stage's guidance
    base = StudyBase(params.preset, spec.row, row.seed, configs, params.evaluate, Path(spec.tokenizer))
    needed = {base.tokenizer: "the tokenizer stage"}
    if cfg.objective == "training":
        configs["model"] = params.row_model(spec.row)
        configs["train"] = params.row_train(spec.row)
        base.latents = Path(spec.latents)
        needed[base.latents / "manifest.json"] = "the latents stage"
    else:
        base.checkpoint = Path(spec.checkpoint or Path("models") / spec.row / "model.pt")
        needed[base.checkpoint] = f"the train@{spec.row} stage"
    for path, stage in needed.items():
        if check_files and not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: it is written by {stage} (dvc repro), or set it under base: in the study file"
            )
    return base


def check_space(cfg: StudyConfig, base: StudyBase, *, source: str) -> None:
    """Fail before any trial if a ``space`` or ``fixed`` key names no field or a bound is invalid.

    Every bound and every choice is applied to the base configs once.

    Args:
        cfg: the study.
        base: its resolved base.
        source: quoted in errors (the study file).
    """
    configs = apply_overrides(base.configs, cfg.fixed, source=source)
    for key, spec in cfg.space.items():
        for value in spec.values():
            apply_overrides(configs, {key: value}, source=f"{source} (space.{key} = {value!r})")


