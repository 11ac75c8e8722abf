"""How a study draws and stops trials: the per-trial seeded sampler and the pruner."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from demar.studies.config import PrunerSpec, SamplerSpec

__all__ = ["TrialSeededSampler", "make_pruner", "make_sampler", "trial_seed"]

def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` of a study seeded ``seed`` (32 bits, as numpy takes).

    Args:
        seed: the study's ``sampler.seed``.
        number: the trial's number.
    """
    from demar.rng import derive_seed

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


