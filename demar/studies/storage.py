"""Where a study lives: its Optuna storage, what it records per trial, and trials of dead workers.

A worker killed mid-trial cannot finish its trial. Such a trial is failed and a
copy with the same params is queued (:func:`retry_dead_trial`): at once when its
worker ran on this host and is gone (:func:`fail_dead_trials`), otherwise by
Optuna's heartbeat once the trial has been silent for twice ``heartbeat_s``.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "PARENT_RUN_ATTR",
    "TRIAL_RUN_ATTR",
    "counted",
    "default_storage",
    "fail_dead_trials",
    "open_storage",
    "redact",
    "retry_dead_trial",
    "worker_attrs",
]

PARENT_RUN_ATTR = "mlflow_parent_run_id"
"""Study user attribute holding the id of the study's MLflow parent run."""

IDENTITY_ATTR = "identity"
"""Study user attribute: ``{"config": sha256, "code": sha256}`` of what computes its trials."""

TRIAL_RUN_ATTR = "mlflow_run_id"
"""Trial user attribute holding the id of the trial's MLflow run."""

WORKER_ATTR = "worker"
"""Trial user attribute naming the worker that ran it (``host:pid``)."""

WORKER_START_ATTR = "worker_started"
"""Trial user attribute: the start time of the worker process (tells a reused pid apart)."""

DEAD_TRIAL_RETRIES = 2
"""How many times the trial of a dead worker is queued again."""

COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
"""Trials that count towards ``n_trials``: finished in any way, or running. A queued trial
(a retry) counts once a worker takes it, and workers take queued trials first."""

SQLITE_TIMEOUT_S = 60
"""How long a sqlite storage waits for another worker's write lock before failing."""

_OPEN_RETRIES = 3
"""Openings of an RDB storage retried when another process was creating its tables at the same time."""


def default_storage(config_path: str | os.PathLike[str], name: str) -> str:
    """The default storage of a study: the sqlite file ``<name>.db`` beside its YAML.

    Args:
        config_path: the study's YAML file.
        name: the study's name.
    """
    return f"sqlite:///{(Path(config_path).resolve().parent / f'{name}.db')}"


def open_storage(
    url: str, heartbeat_s: int | None = None, on_dead: Callable[[optuna.Study, FrozenTrial], None] | None = None
) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``.

    Args:
        url: an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``)
            or the path of a journal file (no ``://``; safe on NFS, no heartbeat).
        heartbeat_s: heartbeat interval of an RDB storage; a running trial without a
            heartbeat for twice this is failed (its worker died) when a worker next
            starts a trial (default None: off).
        on_dead: called with each trial so failed, e.g. :func:`retry_dead_trial`.
    """
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(url)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    heartbeat: dict[str, Any] = {}
    if heartbeat_s:
        heartbeat = {"heartbeat_interval": heartbeat_s, "grace_period": 2 * heartbeat_s,
                     "heartbeat_stale_trial_callback": on_dead}  # fmt: skip
    def rdb() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's terms
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)

    # A fresh database gets its tables from the first RDBStorage; two processes opening it at
    # once (workers, a dashboard, a second machine) can both try, and the slower one fails on
    # "table ... already exists". The tables are there by then, so opening again succeeds.
    for attempt in range(_OPEN_RETRIES):
        try:
            return rdb()
        except sqlalchemy.exc.SQLAlchemyError as err:
            if "already exists" not in str(err):
                raise
            time.sleep(0.2 * (attempt + 1))
    return rdb()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for tags and messages)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def worker_attrs() -> dict[str, Any]:
    """The trial user attributes that name this worker process."""
    import psutil

    return {WORKER_ATTR: f"{socket.gethostname()}:{os.getpid()}", WORKER_START_ATTR: psutil.Process().create_time()}


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``; a failed trial replaced by its retry counts once."""
    trials = study.get_trials(deepcopy=False)
    retried = {h[-1] for t in trials if (h := t.system_attrs.get("retry_history"))}
    return sum(t.state in COUNTED_STATES and not (t.state == TrialState.FAIL and t.number in retried) for t in trials)


def retry_dead_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a copy of a dead worker's failed trial with the same params (at most :data:`DEAD_TRIAL_RETRIES`).

    As Optuna's ``RetryHeartbeatStaleTrialCallback``, but the copy does not inherit
    the dead worker's attributes (its run id and pid), so it never looks dead itself."""
    system_attrs: dict[str, Any] = {"failed_trial": trial.number, "retry_history": [], **trial.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], trial.number]
    if len(system_attrs["retry_history"]) > DEAD_TRIAL_RETRIES:
        return
    own = (WORKER_ATTR, WORKER_START_ATTR, TRIAL_RUN_ATTR)
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={k: v for k, v in trial.user_attrs.items() if k not in own}, system_attrs=system_attrs,
        )
    )  # fmt: skip


def _worker_gone(trial: FrozenTrial) -> bool:
    from demar.tracking import process_alive

    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's worker: its heartbeat tells
    return not process_alive(int(pid), trial.user_attrs.get(WORKER_START_ATTR))


def fail_dead_trials(study: optuna.Study, on_dead: Callable[[optuna.Study, FrozenTrial], None]) -> list[int]:
    """Fail the running trials whose worker is gone, call ``on_dead`` on each; return their numbers.

    Trials of this host's dead workers are failed at once; those of other hosts when
    their heartbeat is older than the grace period (RDB storages with a heartbeat).
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_gone(trial):
            try:
                if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    failed.append(trial.number)
                    on_dead(study, study._storage.get_trial(trial._trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:  # another process did it first
                pass
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():  # "experimental" in Optuna's terms
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # calls the storage's on_dead itself
    failed += sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)
    return failed
