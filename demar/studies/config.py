"""The study file (``studies/<name>.yaml``): search space, sampler, pruner, base row and budget."""

from __future__ import annotations

import os
from typing import Any, Literal

import optuna
from pydantic import Field, ValidationInfo, field_validator, model_validator

from demar.config import StrictConfig, load_yaml, validate

__all__ = [
    "METRIC_GROUPS",
    "OBJECTIVE_VALUES",
    "SECTIONS",
    "BaseSpec",
    "Budget",
    "ParamSpec",
    "PrunerSpec",
    "SamplerSpec",
    "StudyConfig",
    "load_study_config",
]

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

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this dimension (a choice, or a number within the bounds on the step grid)."""
        if self.type == "categorical":
            return value in (self.choices or ())
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and not isinstance(value, int):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        steps = (value - self.low) / self.step
        return abs(steps - round(steps)) < 1e-9

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
        name: the study's name in MLflow; in the storage ``<name>@<identity>``
            (:mod:`demar.studies.identity`).
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
            :class:`demar.model.ModelConfig`, :class:`demar.train_config.TrainConfig` or
            :class:`demar.generate.GenerateConfig`; nested with dots, e.g.
            ``model.noise_injection.max_step``, ``sample.sampler.cfg``).
        enqueue: trials to run first, each a mapping of every ``space`` key to a value
            inside its dimension, e.g. the row's current settings, so the report shows
            what the search gains over them (default none). Run once, when the study
            is created.
        heartbeat_s: seconds between a running trial's heartbeats in an RDB storage; a
            trial silent for twice as long (its worker was killed) is failed and queued
            again when a worker next starts a trial (default 60; None disables it).
            A killed worker of the same host is found at once, without waiting.
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
    enqueue: tuple[dict[str, Any], ...] = ()
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

    @field_validator("enqueue")
    @classmethod
    def _enqueued_points_lie_in_space(cls, v: tuple[dict[str, Any], ...], info: ValidationInfo) -> tuple:
        space: dict[str, ParamSpec] = info.data.get("space") or {}
        for i, point in enumerate(v):
            if set(point) != set(space):
                missing, extra = sorted(set(space) - set(point)), sorted(set(point) - set(space))
                raise ValueError(f"enqueue[{i}] must set every space key: missing {missing}, not in space {extra}")
            for key, value in point.items():
                if not space[key].contains(value):
                    raise ValueError(f"enqueue[{i}].{key} = {value!r} lies outside space.{key}")
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

