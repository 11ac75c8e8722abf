"""The whole ``params.yaml`` as one typed object, and the presets that replace it.

Each stage validates the sections it reads (errors name the key). :func:`load_params`
validates the whole file at once, so an unknown top-level key or a typo in a section
no stage reads is caught too; every stage calls it first through
:func:`pipelines.stage_settings`.

Presets are complete params files in ``presets/``; ``demar preset NAME`` validates
one and writes it over ``params.yaml`` (``params.yaml`` ships as the ``embedded``
preset).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from demar.classifier import ClassifierConfig
from demar.config import ConfigError, StrictConfig, load_yaml, validate
from demar.data import DataConfig
from demar.generate import SampleStageConfig, TimeFidConfig
from demar.io import atomic_write_text
from demar.latents import LatentsConfig
from demar.metrics import EvaluateConfig
from demar.model import ModelConfig
from demar.tokenizer_train import TokenizerStageConfig
from demar.train import RowConfig, row_model_config, row_train_config

__all__ = ["PRESETS_DIR", "Params", "TrackingConfig", "apply_preset", "list_presets", "load_params"]

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class TrackingConfig(StrictConfig):
    """``tracking`` in params.yaml.

    Args:
        enabled: log runs to MLflow (default True).
        system_metrics: log CPU/GPU/memory system metrics with training runs (default True).
    """

    enabled: bool = True
    system_metrics: bool = True


class Params(StrictConfig):
    """Every section of ``params.yaml``; see each section's class for its keys.

    Args:
        preset: the preset's name; MLflow experiments are ``demar-<preset>``.
        train_launcher: the command that starts ``-m pipelines.train`` in ``dvc.yaml``:
            ``python`` (one process) or e.g. ``torchrun --nproc_per_node 8`` (default ``python``).
        tracking: MLflow switches.
        data: the data set (embedded shapes or an image folder).
        tokenizer: train a small KL autoencoder, or load KL-16.
        latents: latent extraction.
        classifier: the embedded-domain classifier (feature extractor of the embedded metrics).
        model: model knobs shared by every row (sizes and head switches come from the rows).
        rows: the trained models: name -> ``{ablation, size, seed}``.
        train: the training recipe.
        sample: sampling of the evaluation images.
        time_fid: the time-vs-FID sweep of Figure 4a.
        evaluate: FID / IS / precision / recall / KID.
        report: the report generators.
    """

    preset: str = Field("embedded", min_length=1)
    train_launcher: str = Field("python", min_length=1)
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerStageConfig = TokenizerStageConfig()
    latents: LatentsConfig = LatentsConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    model: dict[str, Any] = Field(default_factory=dict)
    rows: dict[str, RowConfig] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    sample: SampleStageConfig = SampleStageConfig()
    time_fid: TimeFidConfig = TimeFidConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: dict[str, Any] = Field(default_factory=dict)

    def row_model(self, row: str) -> ModelConfig:
        """The :class:`ModelConfig` of row ``row``."""
        return row_model_config(self.rows[row], self.model, source="params.yaml")


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Validate the whole params file; errors name the file and the dotted key at fault.

    Args:
        path: the params file (default ``"params.yaml"``).
    """
    source = str(path)
    params = validate(Params, load_yaml(path), source=source)
    for name, row in params.rows.items():  # every row must build a model, with the shared knobs
        row_model_config(row, params.model, source=source)
        row_train_config(row, params.train, source=source)
    _validate_report(params.report, source)
    return params


def _validate_report(section: dict[str, Any], source: str) -> None:
    try:
        from reports.build import ReportConfig
    except ImportError:  # the report package is not importable outside the repository
        return
    validate(ReportConfig, section, source=source, prefix="report")


def list_presets(directory: str | os.PathLike[str] = PRESETS_DIR) -> list[str]:
    """Names of the presets in ``directory`` (default the repository's ``presets/``)."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def apply_preset(
    name: str, target: str | os.PathLike[str] = "params.yaml", directory: str | os.PathLike[str] = PRESETS_DIR
) -> Path:
    """Validate preset ``name`` and write it over ``target`` atomically; return the preset file.

    Args:
        name: a preset of ``directory`` (see :func:`list_presets`).
        target: the params file to replace (default ``"params.yaml"``).
        directory: where presets live (default the repository's ``presets/``).
    """
    source = Path(directory) / f"{name}.yaml"
    if not source.is_file():
        known = ", ".join(list_presets(directory)) or "none"
        raise ConfigError(f"unknown preset {name!r} (no {source}); known presets: {known}")
    params = load_params(source)
    if params.preset != name:
        raise ConfigError(f"{source}: preset: must be {name!r}, the file's name (got {params.preset!r})")
    atomic_write_text(target, source.read_text())  # byte-for-byte, comments included
    return source
