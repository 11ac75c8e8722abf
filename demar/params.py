"""The whole ``params.yaml`` as one typed object: its sections, the row schema, and the presets.

A stage reads the file once with :func:`load_params` and hands each component its
section. Validation covers the whole file before any work: unknown keys, strings
where numbers or booleans belong, rows that cannot build a model, no rows at all,
and an image folder inside a DVC output (``dvc repro`` deletes outputs before it
re-runs their stage). Errors name the file and the dotted key.

A row (``rows.<name>``) is one trained model: its ablation, size, seed and,
optionally, its guidance scale. :meth:`Params.row_model`, :meth:`Params.row_train`
and :meth:`Params.sample_config` turn it into the configs of training and
sampling; every stage, the reports and the studies use them.

Presets are complete params files in ``presets/``; ``demar preset NAME`` validates
one and writes it over ``params.yaml`` (``params.yaml`` ships as the ``embedded``
preset).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, create_model, field_validator

from demar.captions import CaptionsStageConfig
from demar.classifier import ClassifierConfig
from demar.diagnostics import DiagnosticsConfig
from demar.config import ConfigError, StrictConfig, load_yaml, validate
from demar.data import DataConfig
from demar.generate import GenerateConfig, SampleStageConfig
from demar.io import atomic_write_text
from demar.latents import LatentsConfig
from demar.metrics import EvaluateConfig
from demar.model import ABLATION_ROWS, ModelConfig
from demar.sizes import SIZES
from demar.time_fid import TimeFidConfig
from demar.tokenizer_train import TokenizerStageConfig
from demar.train_config import TrainConfig

__all__ = [
    "PRESETS_DIR",
    "ModelSection",
    "Params",
    "ReportConfig",
    "RowConfig",
    "TrackingConfig",
    "TrainSection",
    "apply_preset",
    "check_outside_outputs",
    "list_presets",
    "load_params",
    "row_model_config",
    "row_train_config",
]

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# Model keys that each row sets (its size and its ablation's head switches), never ``model``.
ROW_MODEL_KEYS: tuple[str, ...] = ("size", *next(iter(ABLATION_ROWS.values())))


def _section_of(config: type[StrictConfig], name: str, leave_out: tuple[str, ...], doc: str) -> type[StrictConfig]:
    """A config of ``config``'s own fields (types, bounds, defaults) less ``leave_out``: the schema is written once."""
    fields = {k: (f.annotation, copy.copy(f)) for k, f in config.model_fields.items() if k not in leave_out}
    section = create_model(name, __base__=StrictConfig, __module__=__name__, **fields)
    section.__doc__ = doc
    return section


ModelSection = _section_of(
    ModelConfig,
    "ModelSection",
    ROW_MODEL_KEYS,
    """``model`` in params.yaml: the :class:`demar.model.ModelConfig` knobs shared by every row.

    Sizes and head switches come from the rows. Only the keys written here override
    the row's size (``model_dump(exclude_unset=True)``).
    """,
)

TrainSection = _section_of(
    TrainConfig,
    "TrainSection",
    ("seed",),
    """``train`` in params.yaml: :class:`demar.train_config.TrainConfig` less ``seed`` (the row's).""",
)


class TrackingConfig(StrictConfig):
    """``tracking`` in params.yaml.

    Args:
        enabled: log runs to MLflow.
        system_metrics: log CPU/GPU/memory system metrics with training runs.
    """

    enabled: bool = True
    system_metrics: bool = True


class ReportConfig(StrictConfig):
    """``report`` in params.yaml (every key optional).

    Args:
        confidence: coverage of the t-intervals over seeds.
        table4_sizes: the sizes shown in Table 4; None shows every size run with two ablations or more.
        ours_with_cfg: our evaluation samples are guided, so Table 2 puts our numbers in the guided columns.
        paper_overlay: Figure 4b gets a second panel with the paper's B/L/H points.
        figure_dpi: resolution of the PNG figures.
        grid_max_px: longest side of a sample grid in the HTML page; None embeds it as it is.
        mlflow_metrics: metrics shown in the MLflow comparison, those present.
        curve_metric: the training metric drawn from MLflow's history; None draws no curves.
    """

    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    table4_sizes: tuple[str, ...] | None = None
    ours_with_cfg: bool = True
    paper_overlay: bool = True
    figure_dpi: int = Field(150, ge=50)
    grid_max_px: int | None = Field(768, ge=64)
    mlflow_metrics: tuple[str, ...] = (
        "loss",
        "tokens_per_s",
        "wall_s",
        "fid",
        "is",
        "precision",
        "recall",
        "kid",
        "class_accuracy",
        "sec_per_image",
    )
    curve_metric: str | None = "loss"


class RowConfig(StrictConfig):
    """One trained model of ``params.yaml`` (``rows.<row>``): the one row schema.

    Args:
        ablation: the row of Table 4 (its head switches are :data:`demar.model.ABLATION_ROWS`).
        size: a registered model size (:data:`demar.sizes.SIZES`).
        seed: seed of the row's training and of its sampling.
        cfg: the row's classifier-free guidance scale; None samples with ``sample.sampler.cfg``.
    """

    ablation: Literal["mar", "diff_head", "de_head", "demar"]
    size: str
    seed: int = Field(ge=0)
    cfg: float | None = Field(None, ge=0.0)

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: str) -> str:
        if size not in SIZES:
            raise ValueError(f"must be one of {', '.join(SIZES)}")
        return size


def _not_per_row(data: Mapping[str, Any], keys: tuple[str, ...], section: str, why: str, source: str) -> None:
    for key in keys:
        if key in data:
            raise ConfigError(f"invalid configuration in {source}:\n  {section}.{key}: {why}")


def _section(data: Any, cls: type[StrictConfig], name: str, per_row: tuple[str, ...], why: str, source: str) -> Any:
    """Section ``name`` as ``cls``: a validated object passes through, a mapping is checked and validated."""
    if isinstance(data, StrictConfig):
        return data
    _not_per_row(data or {}, per_row, name, why, source)
    return validate(cls, data, source=source, prefix=name)


def row_model_config(
    row: RowConfig, model_section: StrictConfig | Mapping[str, Any] | None, *, source: str = "<params>"
) -> ModelConfig:
    """The :class:`demar.model.ModelConfig` of a row: its size, the shared ``model`` knobs, its head switches.

    Args:
        row: the row.
        model_section: ``params.yaml``'s ``model`` (a :data:`ModelSection` or its mapping).
        source: the file it came from, quoted in errors.
    """
    why = "set per row (rows.<row>), not in model"
    model_section = _section(model_section, ModelSection, "model", ROW_MODEL_KEYS, why, source)
    knobs = model_section.model_dump(exclude_unset=True)
    return ModelConfig.from_section({**knobs, "size": row.size, **ABLATION_ROWS[row.ablation]}, source=source)


def row_train_config(
    row: RowConfig, train_section: StrictConfig | Mapping[str, Any] | None, *, source: str = "<params>"
) -> TrainConfig:
    """The :class:`demar.train_config.TrainConfig` of a row: ``params.yaml``'s ``train`` with the row's seed.

    Args:
        row: the row.
        train_section: ``params.yaml``'s ``train`` (a :data:`TrainSection` or its mapping).
        source: the file it came from, quoted in errors.
    """
    why = "not a key; training uses the row's seed (rows.<row>.seed)"
    train_section = _section(train_section, TrainSection, "train", ("seed",), why, source)
    data = {**train_section.model_dump(exclude_unset=True), "seed": row.seed}
    return validate(TrainConfig, data, source=source, prefix="train")


class Params(StrictConfig):
    """Every section of ``params.yaml``; see each section's class for its keys.

    Args:
        preset: the preset's name; MLflow experiments are ``demar-<preset>``.
        train_launcher: the command that starts ``-m pipelines.train`` in ``dvc.yaml``:
            ``python`` (one process) or e.g. ``torchrun --nproc_per_node 8``.
        tracking: MLflow switches.
        data: the data set (embedded shapes or an image folder).
        tokenizer: train a small KL autoencoder, or load KL-16.
        latents: latent extraction.
        classifier: the embedded-domain classifier (feature extractor of the embedded metrics).
        captions: the text encoder and caption cache of text-conditioned models
            (``model.context: text``; required then, default None).
        model: model knobs shared by every row (sizes and head switches come from the rows).
        rows: the trained models: name -> :class:`RowConfig`.
        train: the training recipe (the seed is the row's).
        sample: sampling of the evaluation images (the seed is the row's, the guidance the row's if set).
        time_fid: the time-vs-FID sweep of Figure 4a.
        evaluate: FID / IS / precision / recall / KID.
        diagnostics: the denoising head's mechanism diagnostics (``diagnose@<row>``).
        report: the report generators.
    """

    preset: str = Field("embedded", min_length=1)
    train_launcher: str = Field("python", min_length=1)
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerStageConfig = TokenizerStageConfig()
    latents: LatentsConfig = LatentsConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    captions: CaptionsStageConfig | None = None
    model: ModelSection = ModelSection()  # type: ignore[valid-type]
    rows: dict[str, RowConfig] = Field(default_factory=dict)
    train: TrainSection = TrainSection()  # type: ignore[valid-type]
    sample: SampleStageConfig = SampleStageConfig()
    time_fid: TimeFidConfig = TimeFidConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    report: ReportConfig = ReportConfig()
    _source: str = PrivateAttr("params.yaml")  # the file, quoted in errors

    def row(self, name: str) -> RowConfig:
        """The row ``rows.<name>``; an unknown name is a :class:`ConfigError` listing the known rows."""
        if name not in self.rows:
            known = ", ".join(self.rows) or "none"
            raise ConfigError(f"invalid configuration in {self._source}:\n  rows.{name}: unknown row (known: {known})")
        return self.rows[name]

    def row_model(self, name: str) -> ModelConfig:
        """The :class:`demar.model.ModelConfig` of row ``name``."""
        return row_model_config(self.row(name), self.model, source=self._source)

    def row_train(self, name: str) -> TrainConfig:
        """The :class:`demar.train_config.TrainConfig` of row ``name`` (its seed is the row's)."""
        return row_train_config(self.row(name), self.train, source=self._source)

    def row_sample(self, name: str) -> SampleStageConfig:
        """The ``sample`` section as row ``name`` samples: ``sampler.cfg`` is ``rows.<name>.cfg`` when set."""
        row = self.row(name)
        if row.cfg is None:
            return self.sample
        return self.sample.model_copy(update={"sampler": self.sample.sampler.model_copy(update={"cfg": row.cfg})})

    def sample_config(self, name: str, num_images: int | None = None) -> GenerateConfig:
        """The :class:`demar.generate.GenerateConfig` of row ``name``: the one road to its sampling settings.

        The sample and time_fid stages and the studies all sample through it, with the
        row's seed and guidance.

        Args:
            name: the row.
            num_images: images to draw (default None: ``sample.num_images``).
        """
        return self.row_sample(name).for_run(self.row(name).seed, num_images)


def _repository_of(path: Path) -> Path | None:
    """The nearest folder holding ``dvc.yaml`` at or above ``path``'s folder, or None."""
    for folder in [path.resolve().parent, *path.resolve().parent.parents]:
        if (folder / "dvc.yaml").is_file():
            return folder
    return None


def _dvc_outputs(repository: Path, params: Mapping[str, Any]) -> list[str]:
    """Every ``outs`` path of ``repository/dvc.yaml``: ``${a.b}`` from ``params``, ``${key}``/``${item}`` kept."""
    stages = (yaml.safe_load((repository / "dvc.yaml").read_text()) or {}).get("stages") or {}
    paths = []
    for stage in stages.values():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        for kind in ("outs", "metrics", "plots"):  # all three are outputs that dvc repro removes
            for out in body.get(kind) or []:
                paths.append(next(iter(out)) if isinstance(out, dict) else str(out))

    def lookup(match: re.Match[str]) -> str:
        value: Any = params
        for part in match.group(1).split("."):
            if not isinstance(value, Mapping) or part not in value:
                return match.group(0)  # a foreach variable: any one path segment
            value = value[part]
        return str(value)

    return [re.sub(r"\$\{\s*([\w.]+)\s*\}", lookup, p) for p in paths]


def _overlaps(folder: tuple[str, ...], output: tuple[str, ...]) -> bool:
    """Whether one of two repository-relative paths lies inside the other (``${...}`` parts match any name)."""
    return all(a == b or b.startswith("${") for a, b in zip(folder, output, strict=False))


def check_outside_outputs(params: Params, source: str | os.PathLike[str], repository: Path | None = None) -> None:
    """Fail if ``data.imagenet.root`` or ``.reference_root`` overlaps a DVC output.

    ``dvc repro`` removes a stage's outputs before running it, so a folder of user
    images inside one would be deleted. Relative folders are resolved against the
    repository (the folder of ``dvc.yaml``, found from ``source`` upwards); without
    a ``dvc.yaml`` there is nothing to check.

    Args:
        params: the validated params.
        source: the params file, quoted in errors.
        repository: the folder of ``dvc.yaml`` (default: found from ``source``).
    """
    folder_cfg = params.data.imagenet
    repository = repository or _repository_of(Path(source))
    if folder_cfg is None or repository is None:
        return
    outputs = _dvc_outputs(repository, params.model_dump(mode="json"))
    repo = repository.resolve()
    for key in ("root", "reference_root"):
        value = getattr(folder_cfg, key)
        if value is None:
            continue
        resolved = (repo / value).resolve()
        if not resolved.is_relative_to(repo):
            continue
        parts = resolved.relative_to(repo).parts
        for out in outputs:
            if _overlaps(parts, Path(out).parts):
                raise ConfigError(
                    f"invalid configuration in {source}:\n  data.imagenet.{key}: {value!r} overlaps the DVC output "
                    f"{out!r}; dvc repro deletes outputs before it re-runs their stage, so keep your images "
                    "outside every output (e.g. datasets/imagenet/train)"
                )


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate the whole params file once; errors name the file and the dotted key at fault.

    Besides each section's schema: ``train.seed``, ``sample.seed`` and the per-row model
    keys are refused, ``rows`` must name at least one row, every row must build its
    model and training configs, and an image folder must lie outside every DVC output.

    Args:
        path: the params file.
    """
    source = str(path)
    data = load_yaml(path)
    for section, keys, why in (
        ("model", ROW_MODEL_KEYS, "set per row (rows.<row>), not in model"),
        ("train", ("seed",), "not a key; training uses the row's seed (rows.<row>.seed)"),
        ("sample", ("seed",), "not a key; sampling uses the row's seed (rows.<row>.seed)"),
    ):
        if isinstance(data.get(section), Mapping):
            _not_per_row(data[section], keys, section, why, source)
    params = validate(Params, data, source=source)
    params._source = source
    if not params.rows:
        raise ConfigError(
            f"invalid configuration in {source}:\n  rows: names no row; every stage after the data needs at least "
            "one (e.g. rows: {demar: {ablation: demar, size: tiny, seed: 0}})"
        )
    for row in params.rows.values():  # every row must build a model and a training run
        row_model_config(row, params.model, source=source)
        row_train_config(row, params.train, source=source)
    if params.model.context == "text" and params.captions is None:
        raise ConfigError(
            f"invalid configuration in {source}:\n  captions: model.context is 'text', so the text encoder must be "
            "given (e.g. captions: {encoder: {kind: minilm, max_length: 16}})"
        )
    check_outside_outputs(params, source)
    return params


def list_presets(directory: str | os.PathLike[str] = PRESETS_DIR) -> list[str]:
    """Names of the presets in ``directory`` (default the repository's ``presets/``)."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def apply_preset(
    name: str, target: str | os.PathLike[str] = "params.yaml", directory: str | os.PathLike[str] = PRESETS_DIR
) -> Path:
    """Validate preset ``name`` and write it over ``target`` atomically; return the preset file.

    Args:
        name: a preset of ``directory`` (see :func:`list_presets`).
        target: the params file to replace.
        directory: where presets live.
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
