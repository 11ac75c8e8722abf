"""Running a study: its storage entry and MLflow parent run, worker processes, one MLflow run per trial.

A run creates the study or loads it, and shares the trials it lacks (``n_trials``
minus its complete, pruned, failed, running and queued trials) among its worker
processes; a worker also stops once the study holds ``n_trials`` trials, whoever
ran them. So a second run of the same command continues the count, and several
machines can run one study. A trial that raises, or whose objective is NaN, is
recorded as failed and the study goes on; the trial of a killed worker is failed
and queued again (:mod:`demar.studies.storage`), and its MLflow run closed as failed.

The process that creates the study opens one MLflow parent run (stage ``study``)
and stores its id as the study's user attribute ``mlflow_parent_run_id``; every
worker, on any machine, opens each trial's run as its child with the trial's params,
objective values and sample grid.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from demar.config import ConfigError, validate
from demar.studies.base import StudyBase, apply_overrides, check_space, resolve_base
from demar.studies.config import StudyConfig, load_study_config
from demar.studies.identity import storage_name, study_identity
from demar.studies.objectives import OBJECTIVES, TrialContext
from demar.studies.report import StudyReport, report_study
from demar.studies.search import make_pruner, make_sampler
from demar.studies.storage import (
    IDENTITY_ATTR,
    PARENT_RUN_ATTR,
    TRIAL_RUN_ATTR,
    counted,
    default_storage,
    fail_dead_trials,
    open_storage,
    redact,
    retry_dead_trial,
    worker_attrs,
)
from demar.tracking import stage_run

__all__ = ["WORK_ROOT", "open_study", "quotas", "run_study"]

PARENT_WAIT_S = 60.0
"""How long a worker that did not create the study waits for the creator's parent run id."""

WORK_ROOT = Path("scratch") / "studies"
"""Default parent folder of the trials' scratch space (``<WORK_ROOT>/<name>/``)."""


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
        for key, value in worker_attrs().items():  # first: a kill from here on is found by the next run
            trial.set_user_attr(key, value)
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
            try:
                configs = apply_overrides(self.base.configs, {**cfg.fixed, **values}, source=self.source)
                ctx = TrialContext(trial, cfg, self.base, configs, work_dir, run, self.progress)
                outcome = OBJECTIVES[cfg.objective](ctx)
                run.log_metrics(outcome.values)
                if outcome.grid is not None and outcome.grid.is_file():
                    run.log_artifact(outcome.grid, "images")
                missing = [k for k in cfg.objectives if k not in outcome.values]
                if missing:
                    raise KeyError(f"the {cfg.objective} objective gave no {missing}, only {sorted(outcome.values)}")
                run.close()  # the grid is read before the scratch folder goes
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


def _on_dead_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A killed worker's trial was failed: queue it again and close its MLflow run as failed."""
    retry_dead_trial(study, trial)
    _close_trial_run(study, trial)


class _StopAtTrials:
    """Study callback: stop the worker once the study holds ``n`` counted trials (any worker's)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if counted(study) >= self.n:
            study.stop()


def _load(cfg: StudyConfig, url: str, name: str) -> optuna.Study:
    storage = open_storage(url, cfg.heartbeat_s, on_dead=_on_dead_trial)
    return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg.sampler),
                             pruner=make_pruner(cfg.pruner))  # fmt: skip


def _work(cfg: StudyConfig, url: str, name: str, parent_run_id: str, quota: int, work_root: Path, progress: bool,
          source: str, base: StudyBase | None = None) -> None:  # fmt: skip
    """One worker: run up to ``quota`` trials, fewer if the study reaches ``cfg.n_trials`` first
    (other machines' workers count too)."""
    base = base or resolve_base(cfg)
    _load(cfg, url, name).optimize(
        _TrialRunner(cfg, base, parent_run_id, work_root, progress, source),
        n_trials=quota,
        catch=(Exception,),
        callbacks=[_StopAtTrials(cfg.n_trials), _close_trial_run],
        gc_after_trial=True,
    )


def _worker_main(cfg_data: dict[str, Any], url: str, name: str, parent_run_id: str, quota: int, work_root: str,
                 threads: int, source: str) -> None:  # fmt: skip
    """Entry point of a spawned worker process."""
    import torch

    torch.set_num_threads(threads)
    cfg = validate(StudyConfig, cfg_data, source=source)
    _work(cfg, url, name, parent_run_id, quota, Path(work_root), False, source)


def quotas(remaining: int, workers: int) -> list[int]:
    """Trials per worker: ``remaining`` split as evenly as possible, workers without trials left out.

    Args:
        remaining: trials this run adds (``n_trials`` minus the trials the study holds).
        workers: worker processes.
    """
    return [q for i in range(workers) if (q := remaining // workers + (i < remaining % workers)) > 0]


def _create_parent_run(cfg: StudyConfig, base: StudyBase, url: str, name: str) -> str:
    with stage_run(
        "study", preset=base.preset, row=base.row, seed=base.seed, run_name=f"study-{name}",
        params={"study": cfg.model_dump(mode="json")},
        tags={"demar.study": cfg.name, "demar.study_storage": redact(url), "demar.study_role": "parent",
              "demar.study_stored_as": name},
    ) as run:  # fmt: skip
        return str(run.run_id)


def _announce_new_identity(cfg: StudyConfig, url: str, name: str) -> None:
    """One line when the storage holds this study made by other code or config."""
    storage = open_storage(url)
    older = [s for s in optuna.get_all_study_names(storage) if s.startswith(f"{cfg.name}@") and s != name]
    if older:
        print(f"study {cfg.name}: the code or config changed since {', '.join(older)}; "
              f"starting {name} (the older trials stay in {redact(url)})")  # fmt: skip


def open_study(cfg: StudyConfig, base: StudyBase, url: str) -> tuple[optuna.Study, str]:
    """Create the study in the storage, or load it, and get-or-create its MLflow parent run.

    The study is stored under :func:`demar.studies.identity.storage_name`, so trials
    computed by other code or config are never mixed in. Creating a study is atomic
    in every Optuna storage, so exactly one process creates it and opens the parent
    run; a process that finds the study waits up to ``PARENT_WAIT_S`` seconds for the
    creator's run id (and opens one itself if the creator died first).

    Args:
        cfg: the study.
        base: its resolved base (preset, row, seed for the parent run's tags).
        url: the storage URL or journal path.

    Returns:
        ``(study, parent run id)``.

    Raises:
        ConfigError: the stored study optimises other directions than ``cfg``.
    """
    identity = study_identity(cfg, base)
    name = storage_name(cfg, identity)
    storage = open_storage(url, cfg.heartbeat_s, on_dead=_on_dead_trial)
    sampler, pruner = make_sampler(cfg.sampler), make_pruner(cfg.pruner)
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, directions=cfg.directions, sampler=sampler, pruner=pruner
        )
        study.set_user_attr(IDENTITY_ATTR, identity)
        for point in cfg.enqueue:  # run first, before the sampler's own draws
            study.enqueue_trial(dict(point), skip_if_exists=True)
        created = True
        _announce_new_identity(cfg, url, name)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        created = False
        stored = [d.name.lower() for d in study.directions]
        if stored != cfg.directions:  # directions are part of the identity: only a hash collision gets here
            raise ConfigError(
                f"study {name!r} in {redact(url)} optimises {stored}, the config asks for {cfg.directions}; "
                "give the study another name or another storage"
            ) from None
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + (0.0 if created else PARENT_WAIT_S)
    while parent is None and time.monotonic() < deadline:
        time.sleep(1.0)
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent is None:
        parent = _create_parent_run(cfg, base, url, name)
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

    The trials the study lacks are shared out among the workers, so running it again
    continues the count and raising ``n_trials`` adds trials. Trials left running by
    killed workers of this host are failed and queued again first. Several machines
    run one study by each calling this with the same ``storage`` URL: every worker
    also stops once the study holds ``n_trials`` trials, and workers that check the
    count at the same moment may each start one trial more.

    Args:
        config: the study file (``studies/<name>.yaml``).
        storage: an Optuna storage URL or journal file path (default
            :func:`~demar.studies.storage.default_storage`, ``<name>.db`` beside the YAML).
        n_trials: override of the file's ``n_trials``.
        workers: worker processes on this machine; 1 runs the trials in this process.
        params: override of ``base.params``.
        out_dir: where the report goes (default ``reports/studies/<name>``).
        work_dir: scratch space of the trials (default ``scratch/studies/<name>``).
        progress: show the trials' progress bars when ``workers == 1``.

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
    dead = fail_dead_trials(study, _on_dead_trial)
    if dead:
        print(f"study {cfg.name}: trial(s) {', '.join(map(str, dead))} of killed workers failed and queued again")
    work_root = Path(work_dir or WORK_ROOT / cfg.name).resolve()
    shares = quotas(cfg.n_trials - counted(study), workers)
    if len(shares) == 1:
        _work(cfg, url, study.study_name, parent, shares[0], work_root, progress, source, base)
    elif shares:
        import torch

        threads = max(1, torch.get_num_threads() // len(shares))
        ctx = mp.get_context("spawn")
        data = cfg.model_dump(mode="json")
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(data, url, study.study_name, parent, quota, str(work_root), threads, source),
                name=f"study-{cfg.name}-{i}",
            )  # fmt: skip
            for i, quota in enumerate(shares)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(
                f"study {cfg.name!r}: worker process(es) failed: {', '.join(failed)}; "
                "running the study again retries their trials"
            )
    return report_study(config, storage=url, out_dir=out_dir, study_name=study.study_name)
