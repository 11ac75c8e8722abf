"""Optuna studies over training and sampling knobs, tracked in MLflow.

A study is a YAML file (``studies/<name>.yaml``, validated by :class:`StudyConfig`):
the search space as data, a seeded sampler, a pruner, the number of trials, the
row of ``params.yaml`` every trial starts from and the trial's budget. The
objective is one of two named library functions (:data:`OBJECTIVES`):

* ``training``: train the row for ``budget.train_steps`` steps with the trial's
  ``model.*`` / ``train.*`` values (noise injection, beta schedule, loss weights),
  then score the EMA model on ``budget.images`` samples. Every ``budget.eval_every``
  steps the training callback scores ``budget.eval_images`` samples, reports the
  value to the trial and stops the run if the pruner says so.
* ``sampling``: sample a trained checkpoint with the trial's ``sample.*`` values
  (guidance scale and schedule, temperature, step counts) and score it; with the
  objectives ``fid`` and ``sec_per_image`` the best trials are a Pareto front.

Both call the functions the DVC stages call: :func:`demar.train.train`,
:func:`demar.generate.generate` and :func:`demar.metrics.compute_metrics`.

Storage and workers. The study lives in an Optuna storage: by default the sqlite
file ``<name>.db`` beside the YAML, or any storage URL (``postgresql://...`` for
many machines) or a journal file (a path ending in ``.log``). A run creates the
study or loads it, and shares the trials it lacks (``n_trials`` minus its complete,
pruned, failed and running trials) among its worker processes; a worker also stops
once the study holds ``n_trials`` trials, whoever ran them. So a second run of the
same command continues the count, and several machines can run one study. A
trial that raises, or whose objective is NaN, is recorded as failed and the study
goes on.
Each trial's sampler is seeded from ``(sampler.seed, trial number)``: workers on any
machine never repeat each other's draws, and a single-worker study is reproducible.

MLflow. The process that creates the study opens one parent run (stage
``study``) and stores its id as the study's user attribute
``mlflow_parent_run_id``; every worker, on any machine, opens each trial's run as
its child (tag ``mlflow.parentRunId``) with the trial's params, objective values
and sample grid. :func:`report_study` draws Optuna's plots with matplotlib and
logs them, the trial table and the best trials to the parent run and to
``reports/studies/<name>/``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import re
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import Field, ValidationInfo, field_validator, model_validator

from demar.config import ConfigError, StrictConfig, load_yaml, validate
from demar.io import atomic_write_bytes, atomic_write_text, write_json
from demar.tracking import RunLogger, check_tracking, stage_run

__all__ = [
    "OBJECTIVES",
    "PARENT_RUN_ATTR",
    "BaseSpec",
    "Budget",
    "InjectedFailure",
    "ParamSpec",
    "PrunerSpec",
    "SamplerSpec",
    "StudyBase",
    "StudyConfig",
    "StudyReport",
    "TrialContext",
    "TrialOutcome",
    "TrialSeededSampler",
    "apply_overrides",
    "budgeted_train_config",
    "check_space",
    "configure_parser",
    "default_storage",
    "load_study_config",
    "main",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "open_study",
    "quotas",
    "redact",
    "report_study",
    "resolve_base",
    "run_study",
    "sampling_objective",
    "training_objective",
    "trial_seed",
]

PARENT_RUN_ATTR = "mlflow_parent_run_id"
"""Study user attribute holding the id of the study's MLflow parent run."""

TRIAL_RUN_ATTR = "mlflow_run_id"
"""Trial user attribute holding the id of the trial's MLflow run."""

SPACE_ATTR = "space"
"""Study user attribute holding the search space the study was created with."""

WORKER_ATTR = "worker"
"""Trial user attribute naming the worker that ran it (``host:pid``)."""

COUNTED_STATES = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
    optuna.trial.TrialState.RUNNING,
)
"""Trials that count towards ``n_trials``: finished in any way, or running."""

# Values an objective can return, and the torch-fidelity metric group that yields each.
METRIC_GROUPS: dict[str, str] = {
    "fid": "fid",
    "is": "isc",
    "precision": "prc",
    "recall": "prc",
    "kid": "kid",
}
OBJECTIVE_VALUES = (*METRIC_GROUPS, "sec_per_image")

# Sections a space key may address, per objective: the config objects a trial builds.
SECTIONS: dict[str, tuple[str, ...]] = {"training": ("model", "train", "sample"), "sampling": ("sample",)}

SQLITE_TIMEOUT_S = 60
"""How long a sqlite storage waits for another worker's write lock before failing."""

PARENT_WAIT_S = 60.0
"""How long a worker that did not create the study waits for the creator's parent run id."""

REPORT_ROOT = Path("reports") / "studies"  # beside reports/out, which the report stage owns
"""Default parent folder of the study reports (``<REPORT_ROOT>/<name>/``)."""

WORK_ROOT = Path("scratch") / "studies"
"""Default parent folder of the trials' scratch space (``<WORK_ROOT>/<name>/``)."""


# ----------------------------------------------------------------------------- configuration


class SamplerSpec(StrictConfig):
    """The Optuna sampler of a study.

    Args:
        kind: ``"tpe"`` (default), ``"gp"`` (Gaussian process, for few expensive
            continuous trials) or ``"random"``.
        seed: base seed; trial ``n`` is sampled with the seed ``trial_seed(seed, n)`` (default 0).
        n_startup_trials: random trials before TPE / GP model the history (default 10).
    """

    kind: Literal["tpe", "gp", "random"] = "tpe"
    seed: int = Field(0, ge=0)
    n_startup_trials: int = Field(10, ge=0)


class PrunerSpec(StrictConfig):
    """The Optuna pruner of a study (single-objective studies only).

    Args:
        kind: ``"median"`` (default), ``"percentile"``, ``"threshold"`` (a report above
            ``upper`` or below ``lower`` stops the trial, e.g. a diverged run) or ``"none"``.
        n_startup_trials: trials never pruned by ``median`` / ``percentile`` (default 5).
        n_warmup_steps: reports below this training step are never pruned (default 0).
        interval_steps: prune only at every this many reports (default 1).
        percentile: the percentile of ``"percentile"`` (default 25.0).
        upper: the upper bound of ``"threshold"`` (default None).
        lower: the lower bound of ``"threshold"`` (default None).
    """

    kind: Literal["median", "percentile", "threshold", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    interval_steps: int = Field(1, ge=1)
    percentile: float = Field(25.0, gt=0.0, lt=100.0)
    upper: float | None = None
    lower: float | None = None

    @model_validator(mode="after")
    def _check(self) -> PrunerSpec:
        if self.kind == "threshold" and self.upper is None and self.lower is None:
            raise ValueError("a threshold pruner needs 'upper' or 'lower'")
        return self


class ParamSpec(StrictConfig):
    """One dimension of the search space.

    Args:
        type: ``"float"``, ``"int"`` or ``"categorical"``.
        low: lower bound (float and int).
        high: upper bound, inclusive (float and int).
        log: sample on a log scale (float and int; default False).
        step: grid step (float and int; default None: continuous, or 1 for int).
        choices: the values of a categorical dimension.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: tuple[str | int | float | bool | None, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty 'choices' list")
            extra = [k for k in ("low", "high", "step") if getattr(self, k) is not None] + (["log"] if self.log else [])
            if extra:
                raise ValueError(f"{', '.join(extra)} do not apply to a categorical dimension")
            return self
        if self.choices is not None:
            raise ValueError(f"'choices' applies to categorical dimensions only, not {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} dimension needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) exceeds high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale dimension needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("'log' and 'step' cannot be combined")
        if self.type == "int":
            for k in ("low", "high", "step"):
                v = getattr(self, k)
                if v is not None and v != int(v):
                    raise ValueError(f"{k} of an int dimension must be an integer, got {v}")
        return self

    def values(self) -> list[Any]:
        """Representative values (the bounds, or every choice) used to check the space early."""
        if self.type == "categorical":
            return list(self.choices or ())
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Draw this dimension's value for ``trial`` under the parameter name ``name``."""
        if self.type == "categorical":
            return trial.suggest_categorical(name, list(self.choices or ()))
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)


class BaseSpec(StrictConfig):
    """Where the trials start from. Paths are relative to the working directory (the
    repository root), as the DVC stages' are.

    Args:
        params: the ``params.yaml`` whose sections give every value the space does not
            set (default ``"params.yaml"``).
        row: the row of ``params.yaml`` (``rows.<row>``) the trials start from.
        checkpoint: the trained model the ``sampling`` objective samples (default None:
            ``models/<row>/model.pt``, the ``train`` stage's output); not used by ``training``.
        tokenizer: the tokenizer bundle that decodes samples (default ``"models/tokenizer.pt"``).
        latents: the latent cache the ``training`` objective trains on (default ``"data/latents"``).
    """

    params: str = "params.yaml"
    row: str
    checkpoint: str | None = None
    tokenizer: str = "models/tokenizer.pt"
    latents: str = "data/latents"


class Budget(StrictConfig):
    """The cost of one trial.

    Args:
        images: images of the trial's final evaluation (a multiple of the class count).
        train_steps: optimizer steps of a ``training`` trial (default None; required there).
        eval_every: steps between the intermediate evaluations a ``training`` trial
            reports for pruning (default None: only the final one).
        eval_images: images of an intermediate evaluation (default None: ``images``).
    """

    images: int = Field(ge=2)
    train_steps: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    eval_images: int | None = Field(None, ge=2)


class StudyConfig(StrictConfig):
    """A study file (``studies/<name>.yaml``).

    Args:
        name: the study's name in the storage and in MLflow.
        objective: the library objective, ``"training"`` or ``"sampling"`` (:data:`OBJECTIVES`).
        objectives: the values to optimise, in order, with their direction, e.g.
            ``{fid: minimize, sec_per_image: minimize}``; names among ``fid``, ``is``,
            ``precision``, ``recall``, ``kid``, ``sec_per_image``.
        sampler: the seeded sampler (default TPE, seed 0).
        pruner: the pruner (default median); must be ``none`` with several objectives.
        n_trials: trials the study runs to, over all workers and runs.
        base: the params file, row and (``sampling``) checkpoint the trials start from.
        budget: the cost of one trial.
        fixed: values set for every trial, keyed like ``space`` (default none).
        space: parameter name -> dimension; a name is the dotted key of the value it
            sets: ``model.<field>``, ``train.<field>`` or ``sample.<field>`` (a field of
            :class:`demar.model.ModelConfig`, :class:`demar.train.TrainConfig` or
            :class:`demar.generate.GenerateConfig`; nested with dots, e.g.
            ``model.noise_injection.max_step``, ``sample.sampler.cfg``).
        fail_trials: trial numbers that raise :class:`InjectedFailure` at their start:
            a test hook for the failure path (default none).
        heartbeat_s: seconds between a running trial's heartbeats in an RDB storage; a
            trial silent for twice as long (its worker was killed) is marked failed when
            a worker next starts a trial (default 60; None disables it).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    objective: Literal["training", "sampling"]
    objectives: dict[str, Literal["minimize", "maximize"]] = Field(min_length=1)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    n_trials: int = Field(ge=1)
    base: BaseSpec
    budget: Budget
    fixed: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, ParamSpec] = Field(min_length=1)
    fail_trials: tuple[int, ...] = ()
    heartbeat_s: int | None = Field(60, ge=1)

    # Cross-field checks sit on the later field, so an error names that key (the fields
    # validated before it are in ``info.data``).

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = [k for k in v if k not in OBJECTIVE_VALUES]
        if unknown:
            raise ValueError(f"unknown value(s) {unknown}; known: {list(OBJECTIVE_VALUES)}")
        return v

    @field_validator("pruner")
    @classmethod
    def _pruning_needs_one_objective(cls, v: PrunerSpec, info: ValidationInfo) -> PrunerSpec:
        if v.kind != "none" and len(info.data.get("objectives") or {}) > 1:
            raise ValueError("pruning needs a single objective: set pruner.kind to none")
        return v

    @field_validator("base")
    @classmethod
    def _checkpoint_for_sampling_only(cls, v: BaseSpec, info: ValidationInfo) -> BaseSpec:
        if info.data.get("objective") == "training" and v.checkpoint is not None:
            raise ValueError("checkpoint is not used by the training objective")
        return v

    @field_validator("budget")
    @classmethod
    def _budget_fits_objective(cls, v: Budget, info: ValidationInfo) -> Budget:
        if info.data.get("objective") == "training":
            if v.train_steps is None:
                raise ValueError("train_steps is required by the training objective")
            if v.eval_every is not None and len(info.data.get("objectives") or {}) > 1:
                raise ValueError("eval_every (intermediate reports) needs a single objective")
        else:
            misplaced = [k for k in ("train_steps", "eval_every", "eval_images") if getattr(v, k) is not None]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)}: used by the training objective only")
        return v

    @field_validator("fixed", "space")
    @classmethod
    def _keys_name_sections(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        sections = SECTIONS.get(info.data.get("objective", ""), ())
        for key in v:
            if sections and (key.partition(".")[0] not in sections or "." not in key):
                raise ValueError(
                    f"key {key!r}: the {info.data['objective']} objective sets "
                    f"{', '.join(s + '.<field>' for s in sections)}"
                )
        both = sorted(set(v) & set(info.data.get("fixed") or {})) if info.field_name == "space" else []
        if both:
            raise ValueError(f"keys both searched and fixed: {both}")
        return v

    @property
    def directions(self) -> list[str]:
        """The optimisation direction of each objective, in order."""
        return list(self.objectives.values())


def load_study_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study file; errors name the file and the key at fault.

    Args:
        path: the YAML file, e.g. ``studies/cfg.yaml``.
    """
    return validate(StudyConfig, load_yaml(path), source=str(path))


# ----------------------------------------------------------------------------- sampler, pruner


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` of a study seeded ``seed`` (32 bits, as numpy takes).

    Args:
        seed: the study's ``sampler.seed``.
        number: the trial's number.
    """
    from demar.train import derive_seed

    return derive_seed(seed, "study-trial", number) % 2**32


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler rebuilt before every trial with the seed :func:`trial_seed` ``(seed, trial.number)``.

    Trial numbers are unique in a storage, so workers on any machine never draw the
    same random values, and a study re-run with the same history proposes the same
    trials. TPE and GP read the whole history from the storage at every trial, so a
    fresh instance per trial loses nothing but the seed's position.

    Args:
        factory: builds the wrapped sampler from a seed.
        seed: the base seed.
    """

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._inner = factory(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._factory(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):  # noqa: ANN001, ANN201 - Optuna's interface
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # noqa: ANN001, ANN201
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: ANN001, ANN201
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(spec: SamplerSpec) -> optuna.samplers.BaseSampler:
    """The sampler ``spec`` names, seeded per trial (:class:`TrialSeededSampler`).

    Args:
        spec: kind, seed and startup trials.
    """
    samplers = optuna.samplers

    def build(seed: int) -> optuna.samplers.BaseSampler:
        if spec.kind == "random":
            return samplers.RandomSampler(seed=seed)
        if spec.kind == "gp":
            return samplers.GPSampler(seed=seed, n_startup_trials=spec.n_startup_trials)
        return samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup_trials)

    return TrialSeededSampler(build, spec.seed)


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    """The pruner ``spec`` names.

    Args:
        spec: kind and its settings.
    """
    steps = {"n_warmup_steps": spec.n_warmup_steps, "interval_steps": spec.interval_steps}
    if spec.kind == "median":
        return optuna.pruners.MedianPruner(spec.n_startup_trials, **steps)
    if spec.kind == "percentile":
        return optuna.pruners.PercentilePruner(spec.percentile, spec.n_startup_trials, **steps)
    if spec.kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=spec.lower, upper=spec.upper, **steps)
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------- storage


def default_storage(config_path: str | os.PathLike[str], name: str) -> str:
    """The default storage of a study: the sqlite file ``<name>.db`` beside its YAML.

    Args:
        config_path: the study's YAML file.
        name: the study's name.
    """
    return f"sqlite:///{(Path(config_path).resolve().parent / f'{name}.db')}"


def open_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``.

    Args:
        url: an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``)
            or the path of a journal file (no ``://``; safe on NFS, no heartbeat).
        heartbeat_s: heartbeat interval of an RDB storage; stale trials are failed
            after twice this (default None: off).
    """
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(url)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    heartbeat = {"heartbeat_interval": heartbeat_s, "grace_period": 2 * heartbeat_s} if heartbeat_s else {}
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's terms
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for tags and messages)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


# ----------------------------------------------------------------------------- configs of a trial


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
    if spec.row not in params.rows:
        known = ", ".join(params.rows)
        raise ConfigError(f"invalid configuration in {source}:\n  rows.{spec.row}: unknown row (known: {known})")
    row = params.rows[spec.row]
    configs: dict[str, StrictConfig] = {"sample": params.sample}
    base = StudyBase(params.preset, spec.row, row.seed, configs, params.evaluate, Path(spec.tokenizer))
    needed = {base.tokenizer: "the tokenizer stage"}
    if cfg.objective == "training":
        configs["model"] = params.row_model(spec.row)
        from demar.train import row_train_config

        configs["train"] = row_train_config(row, params.train, source=source)
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


# ----------------------------------------------------------------------------- objectives


class InjectedFailure(RuntimeError):
    """Raised at the start of a trial listed in ``fail_trials`` (a test hook)."""


@dataclass
class TrialContext:
    """What an objective gets for one trial.

    Attributes:
        trial: the Optuna trial (for intermediate reports and pruning).
        study: the study's config.
        base: the resolved base.
        configs: the base configs with the fixed and the trial's values set.
        work_dir: an empty folder for the trial's files (removed after the trial).
        run: the trial's MLflow run.
        progress: show progress bars.
    """

    trial: optuna.Trial
    study: StudyConfig
    base: StudyBase
    configs: dict[str, StrictConfig]
    work_dir: Path
    run: RunLogger
    progress: bool = False


@dataclass
class TrialOutcome:
    """What an objective returns.

    Attributes:
        values: every value measured (the study's objectives and any extra ones).
        grid: a sample grid image of the trial, or None.
    """

    values: dict[str, float]
    grid: Path | None = None


def _score(ctx: TrialContext, model: Any, tokenizer: Any, num_images: int, out_dir: Path,
           names: Sequence[str]) -> tuple[dict[str, float], Any]:  # fmt: skip
    """Sample ``num_images`` images as the ``sample`` stage does and score them as ``evaluate`` does.

    Returns ``(values, GenerateResult)``; values hold the requested metrics and ``sec_per_image``.
    """
    from demar.generate import GeneratedImages, generate
    from demar.metrics import compute_metrics

    gen_cfg = ctx.configs["sample"].for_run(ctx.base.seed, num_images)
    result = generate(
        model, tokenizer, gen_cfg, out_dir, num_classes=model.cfg.num_classes, progress=ctx.progress,
        on_mismatch="restart",
    )  # fmt: skip
    values: dict[str, float] = {}
    groups = sorted({METRIC_GROUPS[n] for n in names if n in METRIC_GROUPS})
    if groups:
        kwargs = {**ctx.base.evaluate.metric_kwargs(), "metrics": tuple(groups)}
        values.update(compute_metrics(GeneratedImages(out_dir), ctx.base.evaluate.reference, **kwargs, progress=False))
    if result.sec_per_image is not None:
        values["sec_per_image"] = float(result.sec_per_image)
    return values, result


def budgeted_train_config(cfg: Any, steps: int, num_images: int) -> Any:
    """``cfg`` shortened to ``steps`` optimizer steps over ``num_images`` images.

    The length becomes ``epochs = steps * batch_size / num_images`` and the warm-up
    keeps its share of the run (``warmup_epochs`` scaled by the same factor).

    Args:
        cfg: the row's :class:`demar.train.TrainConfig`.
        steps: the trial's steps.
        num_images: images in the latent set.
    """
    epochs = steps * cfg.batch_size / num_images
    data = {**cfg.model_dump(), "epochs": epochs, "warmup_epochs": cfg.warmup_epochs * epochs / cfg.epochs}
    return validate(type(cfg), data, source="study budget", prefix="train")


def training_objective(ctx: TrialContext) -> TrialOutcome:
    """Train the row with the trial's values for ``budget.train_steps`` steps and score it.

    Every ``budget.eval_every`` steps (before the last) the EMA model is scored on
    ``budget.eval_images`` images; the first objective's value is reported to the
    trial, logged as ``intermediate/<name>`` and the run stops if the pruner says so
    (:class:`optuna.TrialPruned`). At the end the EMA weights of ``model.pt`` are
    scored on ``budget.images`` images.

    Args:
        ctx: the trial's context (configs ``model``, ``train``, ``sample``).
    """
    from demar.distributed import resolve_device
    from demar.latents import LatentDataset
    from demar.model import load_model
    from demar.tokenizer import Tokenizer
    from demar.train import train

    budget, names = ctx.study.budget, list(ctx.study.objectives)
    steps = int(budget.train_steps or 0)
    train_cfg = budgeted_train_config(ctx.configs["train"], steps, len(LatentDataset(ctx.base.latents)))
    device = resolve_device(train_cfg.device)
    tokenizer = Tokenizer.load(ctx.base.tokenizer, map_location=device)

    def evaluate_during_training(step: int, model: Any, ema_model: Any) -> None:
        if budget.eval_every is None or step % budget.eval_every or step >= steps:
            return
        out = ctx.work_dir / f"eval-{step:07d}"
        values, _ = _score(ctx, ema_model, tokenizer, budget.eval_images or budget.images, out, names[:1])
        shutil.rmtree(out, ignore_errors=True)
        value = values[names[0]]
        ctx.run.log_metrics({f"intermediate/{names[0]}": value}, step=step)
        ctx.trial.report(value, step)
        if ctx.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with {names[0]} = {value:.4g}")

    result = train(
        ctx.configs["model"], train_cfg, latents_dir=ctx.base.latents, out_dir=ctx.work_dir / "train",
        run=ctx.run, callback=evaluate_during_training, progress=ctx.progress,
    )  # fmt: skip
    model = load_model(result.model_path, use_ema=ctx.configs["sample"].use_ema, map_location=device)
    values, gen = _score(ctx, model, tokenizer, budget.images, ctx.work_dir / "samples", names)
    if len(names) == 1:
        ctx.trial.report(values[names[0]], steps)
    values["train_loss"] = float(result.metrics["loss"])
    return TrialOutcome(values, gen.grid)


def sampling_objective(ctx: TrialContext) -> TrialOutcome:
    """Sample ``base.checkpoint`` with the trial's ``sample.*`` values and score ``budget.images`` images.

    Args:
        ctx: the trial's context (config ``sample``).
    """
    from demar.distributed import resolve_device
    from demar.model import load_model
    from demar.tokenizer import Tokenizer

    device = resolve_device("auto")
    model = load_model(ctx.base.checkpoint, use_ema=ctx.configs["sample"].use_ema, map_location=device)
    tokenizer = Tokenizer.load(ctx.base.tokenizer, map_location=device)
    values, gen = _score(ctx, model, tokenizer, ctx.study.budget.images, ctx.work_dir / "samples",
                         list(ctx.study.objectives))  # fmt: skip
    return TrialOutcome(values, gen.grid)


OBJECTIVES: dict[str, Callable[[TrialContext], TrialOutcome]] = {
    "training": training_objective,
    "sampling": sampling_objective,
}
"""The named objectives a study file can choose (``objective:``)."""


# ----------------------------------------------------------------------------- trials and workers


def _warn_tracking(what: str, fn: Callable[[], Any]) -> None:
    """Run an MLflow call; a failure is a warning, never the end of the study."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - tracking must never stop the work
        warnings.warn(f"MLflow {what} failed ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)


class _TrialRunner:
    """The function Optuna calls per trial: one child MLflow run around the named objective."""

    def __init__(self, cfg: StudyConfig, base: StudyBase, parent_run_id: str, work_root: Path, progress: bool,
                 source: str) -> None:  # fmt: skip
        self.cfg, self.base, self.parent_run_id = cfg, base, parent_run_id
        self.work_root, self.progress, self.source = work_root, progress, source

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        cfg = self.cfg
        values = {key: spec.suggest(trial, key) for key, spec in cfg.space.items()}
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "demar.study": cfg.name,
            "demar.study_role": "trial",
            "demar.trial": trial.number,
        }
        work_dir = self.work_root / f"trial-{trial.number:05d}"
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        with stage_run(
            "study", preset=self.base.preset, row=self.base.row, seed=self.base.seed,
            params={**cfg.fixed, **values}, tags=tags, run_name=f"{cfg.name}-trial-{trial.number}",
        ) as run:  # fmt: skip
            trial.set_user_attr(TRIAL_RUN_ATTR, run.run_id)
            trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
            try:
                if trial.number in cfg.fail_trials:
                    raise InjectedFailure(f"trial {trial.number} is listed in fail_trials of {self.source}")
                configs = apply_overrides(self.base.configs, {**cfg.fixed, **values}, source=self.source)
                ctx = TrialContext(trial, cfg, self.base, configs, work_dir, run, self.progress)
                outcome = OBJECTIVES[cfg.objective](ctx)
                run.log_metrics(outcome.values)
                if outcome.grid is not None and outcome.grid.is_file():
                    run.log_artifact(outcome.grid, "images")
                missing = [k for k in cfg.objectives if k not in outcome.values]
                if missing:
                    raise KeyError(f"the {cfg.objective} objective gave no {missing}, only {sorted(outcome.values)}")
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)
        return tuple(float(outcome.values[k]) for k in cfg.objectives)


def _close_trial_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Study callback: give the trial's MLflow run its final Optuna state and status."""
    run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
    if run_id is None:
        return
    import mlflow

    state = trial.state.name
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")

    def close() -> None:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "demar.trial_state", state)
        client.set_terminated(run_id, status)

    _warn_tracking("closing a trial run", close)


def _counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED_STATES))


def _work(cfg: StudyConfig, url: str, parent_run_id: str, quota: int, work_root: Path, progress: bool,
          source: str, base: StudyBase | None = None) -> None:  # fmt: skip
    """One worker: run up to ``quota`` trials, fewer if the study reaches ``cfg.n_trials`` first
    (other machines' workers count too)."""
    base = base or resolve_base(cfg)
    study = optuna.load_study(
        study_name=cfg.name, storage=open_storage(url, cfg.heartbeat_s),
        sampler=make_sampler(cfg.sampler), pruner=make_pruner(cfg.pruner),
    )  # fmt: skip
    study.optimize(
        _TrialRunner(cfg, base, parent_run_id, work_root, progress, source),
        n_trials=quota,
        catch=(Exception,),
        callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=COUNTED_STATES), _close_trial_run],
        gc_after_trial=True,
    )


def _worker_main(cfg_data: dict[str, Any], url: str, parent_run_id: str, quota: int, work_root: str,
                 threads: int, source: str) -> None:  # fmt: skip
    """Entry point of a spawned worker process."""
    import torch

    torch.set_num_threads(threads)
    cfg = validate(StudyConfig, cfg_data, source=source)
    _work(cfg, url, parent_run_id, quota, Path(work_root), False, source)


def quotas(remaining: int, workers: int) -> list[int]:
    """Trials per worker: ``remaining`` split as evenly as possible, workers without trials left out.

    Args:
        remaining: trials this run adds (``n_trials`` minus the trials the study holds).
        workers: worker processes.
    """
    return [q for i in range(workers) if (q := remaining // workers + (i < remaining % workers)) > 0]


def _create_parent_run(cfg: StudyConfig, base: StudyBase, url: str) -> str:
    with stage_run(
        "study", preset=base.preset, row=base.row, seed=base.seed, run_name=f"study-{cfg.name}",
        params={"study": cfg.model_dump(mode="json")},
        tags={"demar.study": cfg.name, "demar.study_storage": redact(url), "demar.study_role": "parent"},
    ) as run:  # fmt: skip
        return str(run.run_id)


def open_study(cfg: StudyConfig, base: StudyBase, url: str) -> tuple[optuna.Study, str]:
    """Create the study in the storage, or load it, and get-or-create its MLflow parent run.

    Creating a study is atomic in every Optuna storage, so exactly one process
    creates it and opens the parent run; a process that finds the study waits up to
    ``PARENT_WAIT_S`` seconds for the creator's run id (and opens one itself if the
    creator died first).

    Args:
        cfg: the study.
        base: its resolved base (preset, row, seed for the parent run's tags).
        url: the storage URL or journal path.

    Returns:
        ``(study, parent run id)``.

    Raises:
        ConfigError: the stored study optimises other directions than ``cfg``.
    """
    storage = open_storage(url, cfg.heartbeat_s)
    sampler, pruner = make_sampler(cfg.sampler), make_pruner(cfg.pruner)
    try:
        study = optuna.create_study(
            study_name=cfg.name, storage=storage, directions=cfg.directions, sampler=sampler, pruner=pruner
        )
        study.set_user_attr(SPACE_ATTR, cfg.model_dump(mode="json")["space"])
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner)
        created = False
        stored = [d.name.lower() for d in study.directions]
        if stored != cfg.directions:
            raise ConfigError(
                f"study {cfg.name!r} in {redact(url)} optimises {stored}, the config asks for {cfg.directions}; "
                "give the study another name or another storage"
            ) from None
        if study.user_attrs.get(SPACE_ATTR, {}) != cfg.model_dump(mode="json")["space"]:
            warnings.warn(
                f"study {cfg.name!r}: the search space differs from the one it was created with; "
                "earlier trials are kept and the sampler uses those that fit",
                RuntimeWarning,
                stacklevel=2,
            )
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + (0.0 if created else PARENT_WAIT_S)
    while parent is None and time.monotonic() < deadline:
        time.sleep(1.0)
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent is None:
        parent = _create_parent_run(cfg, base, url)
        study.set_user_attr(PARENT_RUN_ATTR, parent)
    return study, parent


def run_study(
    config: str | os.PathLike[str],
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    workers: int = 1,
    params: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> StudyReport:
    """Run a study to ``n_trials`` trials with ``workers`` processes, then report it.

    The trials the study lacks (``n_trials`` minus its complete, pruned, failed or
    running trials) are shared out among the workers, so running it again continues
    the count and raising ``n_trials`` adds trials. Several machines run one study by
    each calling this with the same ``storage`` URL: every worker also stops once the
    study holds ``n_trials`` trials, and workers that check the count at the same
    moment may each start one trial more (Optuna's ``MaxTrialsCallback`` semantics).

    Args:
        config: the study file (``studies/<name>.yaml``).
        storage: an Optuna storage URL or journal file path (default None:
            :func:`default_storage`, ``<name>.db`` beside the YAML).
        n_trials: override of the file's ``n_trials`` (default None).
        workers: worker processes on this machine; 1 runs the trials in this process (default 1).
        params: override of ``base.params`` (default None).
        out_dir: where the report goes (default None: ``reports/studies/<name>``).
        work_dir: scratch space of the trials (default None: ``scratch/studies/<name>``).
        progress: show the trials' progress bars when ``workers == 1`` (default True).

    Raises:
        ConfigError: the study file, params or space is invalid (before any trial).
        RuntimeError: a worker process died (a failing trial does not do that).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    source = str(config)
    cfg = load_study_config(config)
    params_file = str(Path(params or cfg.base.params).resolve())
    update: dict[str, Any] = {"base": {**cfg.base.model_dump(), "params": params_file}}
    if n_trials is not None:
        update["n_trials"] = n_trials
    cfg = validate(StudyConfig, {**cfg.model_dump(mode="json"), **update}, source=source)
    url = storage or default_storage(config, cfg.name)
    base = resolve_base(cfg)
    check_space(cfg, base, source=source)
    study, parent = open_study(cfg, base, url)
    work_root = Path(work_dir or WORK_ROOT / cfg.name).resolve()
    shares = quotas(cfg.n_trials - _counted(study), workers)
    if len(shares) == 1:
        _work(cfg, url, parent, shares[0], work_root, progress, source, base)
    elif shares:
        import torch

        threads = max(1, torch.get_num_threads() // len(shares))
        ctx = mp.get_context("spawn")
        data = cfg.model_dump(mode="json")
        procs = [
            ctx.Process(
                target=_worker_main, args=(data, url, parent, quota, str(work_root), threads, source),
                name=f"study-{cfg.name}-{i}",
            )  # fmt: skip
            for i, quota in enumerate(shares)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        dead = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
        if dead:
            raise RuntimeError(f"study {cfg.name!r}: worker process(es) failed: {', '.join(dead)}")
    return report_study(config, storage=url, out_dir=out_dir)


# ----------------------------------------------------------------------------- report

PLOT_DPI = 120
"""Resolution of the study plots (PNG)."""


@dataclass
class StudyReport:
    """What :func:`report_study` found and wrote.

    Attributes:
        name: the study's name.
        counts: number of trials per Optuna state (``COMPLETE``, ``PRUNED``, ``FAIL``, ...).
        best: the best trials (the Pareto front with several objectives): ``number``,
            ``values`` (name -> value), ``params``, ``mlflow_run_id``.
        files: the files written to the report folder.
        parent_run_id: the study's MLflow parent run, or None.
    """

    name: str
    counts: dict[str, int]
    best: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    parent_run_id: str | None = None


def _save_figure(ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plots(study: optuna.Study, names: list[str], out: Path) -> list[Path]:
    """Optuna's matplotlib plots: history per objective, importances (>= 2 complete trials),
    the Pareto front (several objectives) and the intermediate values (pruned studies)."""
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    multi = len(names) > 1
    jobs: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
    for i, name in enumerate(names):
        suffix = f"_{name}" if multi else ""
        per_objective = {"target": (lambda t, i=i: t.values[i]) if multi else None, "target_name": name}
        jobs.append((f"history{suffix}", vis.plot_optimization_history, per_objective))
        if len(complete) >= 2:
            jobs.append((f"importances{suffix}", vis.plot_param_importances, per_objective))
    if multi and complete:
        jobs.append(("pareto_front", vis.plot_pareto_front, {"target_names": names}))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        jobs.append(("intermediate_values", vis.plot_intermediate_values, {}))
    files = []
    for stem, plot, kwargs in jobs:
        try:
            with warnings.catch_warnings():  # Optuna's notes on experimental plots and importances
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                files.append(_save_figure(plot(study, **kwargs), out / f"{stem}.png"))
        except Exception as err:  # noqa: BLE001 - one plot that cannot be drawn must not stop the report
            warnings.warn(f"study plot {stem!r} not drawn ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
    return files


def report_study(
    config: str | os.PathLike[str],
    *,
    storage: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> StudyReport:
    """Write a study's plots, trial table and best trials, and log them to its MLflow parent run.

    Writes ``trials.csv``, ``best_trials.json`` and the PNG plots to ``out_dir`` and
    copies them into the parent run's artifacts under ``study/``; sets the parent's
    metrics ``trials_<state>`` and ``best_<objective>`` (one objective) or
    ``pareto_size`` (several), and tags ``demar.best.<param>`` (one objective).

    Args:
        config: the study file.
        storage: the storage URL or journal path (default None: :func:`default_storage`).
        out_dir: the report folder (default None: ``reports/studies/<name>``).
    """
    cfg = load_study_config(config)
    url = storage or default_storage(config, cfg.name)
    local = Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None if "://" in url else Path(url)
    try:
        if local is not None and not local.is_file():  # do not leave an empty storage behind
            raise KeyError(url)
        study = optuna.load_study(study_name=cfg.name, storage=open_storage(url))
    except KeyError:
        raise FileNotFoundError(f"no study {cfg.name!r} in {redact(url)}: run it first") from None
    names = list(cfg.objectives)
    out = Path(out_dir or REPORT_ROOT / cfg.name)
    out.mkdir(parents=True, exist_ok=True)

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best_trials = (study.best_trials if len(names) > 1 else [study.best_trial]) if complete else []
    best = [
        {
            "number": t.number,
            "values": dict(zip(names, t.values, strict=True)),
            "params": t.params,
            "mlflow_run_id": t.user_attrs.get(TRIAL_RUN_ATTR),
        }
        for t in sorted(best_trials, key=lambda t: t.number)
    ]
    files = [out / "best_trials.json", out / "trials.csv"]
    write_json(files[0], {"study": cfg.name, "objectives": cfg.objectives, "counts": counts, "best": best})
    atomic_write_text(files[1], study.trials_dataframe().to_csv(index=False) if trials else "")
    files += _plots(study, names, out)

    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent is not None:
        _warn_tracking("connecting", check_tracking)
        log = RunLogger(parent)
        step = len(trials)
        metrics = {f"trials_{state.lower()}": n for state, n in counts.items()}
        if len(names) == 1 and best:
            metrics[f"best_{names[0]}"] = best[0]["values"][names[0]]
            tags = {f"demar.best.{k}": v for k, v in best[0]["params"].items()}
            log.set_tags({**tags, "demar.best.trial": best[0]["number"]})
        elif best:
            metrics["pareto_size"] = len(best)
        log.log_metrics(metrics, step=step)
        log.flush()
        for f in files:
            log.log_artifact(f, "study")
    return StudyReport(cfg.name, counts, best, files, parent)


# ----------------------------------------------------------------------------- command line


def _cmd_run(args: argparse.Namespace) -> int:
    report = run_study(
        _config_path(args), storage=args.storage, n_trials=args.n_trials, workers=args.workers,
        params=args.params, out_dir=args.out, work_dir=args.work_dir, progress=not args.no_progress,
    )  # fmt: skip
    _print_report(report)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    _print_report(report_study(_config_path(args), storage=args.storage, out_dir=args.out))
    return 0


def _config_path(args: argparse.Namespace) -> Path:
    path = Path(args.config or Path("studies") / f"{args.name}.yaml")
    name = load_study_config(path).name
    if name != args.name:
        raise ConfigError(f"{path} defines the study {name!r}, not {args.name!r}")
    return path


def _print_report(report: StudyReport) -> None:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(report.counts.items())) or "no trials"
    print(f"study {report.name}: {counts}")
    for b in report.best:
        values = ", ".join(f"{k}={v:.4g}" for k, v in b["values"].items())
        print(f"  best trial {b['number']}: {values}  {b['params']}")
    if report.files:
        print(f"wrote {len(report.files)} files to {report.files[0].parent}")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``run`` and ``report`` subcommands to ``parser``; each sets ``func(args) -> int``.

    ``demar study`` reuses this on its own sub-parser.

    Args:
        parser: the parser to extend.
    """
    sub = parser.add_subparsers(dest="study_command", required=True, metavar="COMMAND")
    for verb, helptext, func in (
        ("run", "run a study (continues a stored one) and report it", _cmd_run),
        ("report", "draw the plots and summary of a stored study", _cmd_report),
    ):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("name", help="the study's name (studies/<name>.yaml)")
        p.add_argument("--config", help="the study file (default: studies/<name>.yaml)")
        p.add_argument("--storage", help="Optuna storage URL or journal file (default: <name>.db beside the config)")
        p.add_argument("--out", help="report folder (default: reports/studies/<name>)")
        p.set_defaults(func=func)
        if verb == "run":
            p.add_argument("--n-trials", type=int, help="trials the study runs to (default: the file's n_trials)")
            p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1)")
            p.add_argument("--params", help="params file (default: the file's base.params)")
            p.add_argument("--work-dir", help="trials' scratch folder (default: scratch/studies/<name>)")
            p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m demar.studies run|report NAME ...``.

    Args:
        argv: the arguments (default None: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m demar.studies", description=__doc__.splitlines()[0])
    configure_parser(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    from demar.studies import main as _main  # the importable module, so spawned workers find their target

    sys.exit(_main())
