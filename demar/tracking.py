"""MLflow tracking shared by every stage, study and training run.

* The tracking URI defaults to ``sqlite:///<repository root>/mlflow.db`` (artifacts
  beside it in ``mlartifacts/``); ``MLFLOW_TRACKING_URI`` overrides it.
* :func:`stage_run` opens a run tagged with the DVC stage, ablation row, seed, git
  commit, dirty flag, the id of the current ``dvc repro`` (shared by all stages of one
  reproduction) and the process that owns it (host, pid, start time).
* An unreachable or read-only tracking store at start is a :class:`TrackingError`
  before any work.
* Logging never blocks the work: :class:`RunLogger` sends from a background thread
  through a bounded queue, and MLflow's HTTP calls get short timeouts and few retries.
  When the store stops answering, one warning is printed, the run goes on, and what
  was not sent is spooled to disk (:func:`unsynced_dir`); ``demar tracking sync``
  (:func:`demar.tracking_sync.sync_unsynced`) replays it once the store is back.
* Runs left ``RUNNING`` by a killed process on this host are closed as ``FAILED``
  when any stage of the same experiment starts (:func:`close_stale_runs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import queue
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RunLogger",
    "TrackingError",
    "check_tracking",
    "close_stale_runs",
    "experiment_name",
    "flatten",
    "git_state",
    "process_alive",
    "repo_root",
    "repro_id",
    "stage_run",
    "tracking_uri",
    "unsynced_dir",
]

TAG_PREFIX = "demar."

HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""MLflow's HTTP settings unless the user set them: a dead server costs seconds, not minutes
(MLflow's own defaults, 120 s per request and 7 retries with doubling back-off, froze runs)."""

QUEUE_SIZE = 1000
"""Calls (a metric batch is one) waiting for the background sender; when full, the run goes offline."""

CLOSE_TIMEOUT_S = 30.0
"""Longest wait at the end of a run for the background sender; what is left is spooled."""

UNSYNCED_ENV = "DEMAR_UNSYNCED_DIR"
"""Environment variable that moves the spool of unsent tracking calls (:func:`unsynced_dir`)."""


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


def repo_root() -> Path:
    """The repository root: ``$DVC_ROOT`` inside a DVC stage, else git's top level, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        )
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a sqlite file ``mlflow.db`` at the repository root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def unsynced_dir() -> Path:
    """Where runs that lost their tracking store spool what was not sent: ``$DEMAR_UNSYNCED_DIR``,
    else ``mlartifacts/unsynced/`` at the repository root (ignored by git, outside every stage output)."""
    if os.environ.get(UNSYNCED_ENV):
        return Path(os.environ[UNSYNCED_ENV])
    return repo_root() / "mlartifacts" / "unsynced"


def experiment_name(preset: str) -> str:
    """The MLflow experiment of a preset, e.g. ``demar-embedded``."""
    return f"demar-{preset}"


def git_state(root: Path | None = None) -> dict[str, str]:
    """``{"git_commit": sha or "unknown", "git_dirty": "true"|"false"|"unknown"}`` of the repository."""
    root = root or repo_root()
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {"git_commit": sha, "git_dirty": "true" if status.strip() else "false"}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def repro_id() -> str:
    """An id shared by every stage of one ``dvc repro`` (or one manual invocation).

    ``$DEMAR_REPRO_ID`` wins. Inside a DVC stage it is derived from the ``dvc`` process
    that runs the stages (its pid and start time), so all stages of one reproduction
    agree and two reproductions differ. Outside DVC it is derived from this process.
    """
    if os.environ.get("DEMAR_REPRO_ID"):
        return os.environ["DEMAR_REPRO_ID"]
    try:
        import psutil

        proc = psutil.Process()
        anchor = proc
        if os.environ.get("DVC_STAGE"):
            for parent in proc.parents():
                cmd = " ".join(parent.cmdline()).lower()
                if "dvc" in cmd and ("repro" in cmd or "exp" in cmd):
                    anchor = parent
                    break
        key = f"{anchor.pid}-{anchor.create_time()}"
    except Exception:  # psutil missing or no permission: fall back to this process
        key = f"{os.getpid()}-{time.time()}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys; lists and tuples become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = str(list(v))
        else:
            out[key] = v
    return out


def _bound_http() -> None:
    """Give MLflow's HTTP calls the short limits of :data:`HTTP_LIMITS` (user settings win)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_tracking(uri: str | None = None) -> str:
    """Raise :class:`TrackingError` unless the tracking store at ``uri`` answers and can be written.

    Returns:
        The URI.
    """
    import mlflow

    uri = uri or tracking_uri()
    _bound_http()
    db = _sqlite_file(uri)
    if db is not None:
        unwritable = db if db.exists() else db.parent
        if unwritable.exists() and not os.access(unwritable, os.W_OK):
            raise TrackingError(
                f"MLflow tracking store {unwritable} is read-only: make it writable, or set "
                "MLFLOW_TRACKING_URI to a writable store (or turn tracking off: tracking.enabled: false)"
            )
    try:
        if uri.startswith(("http://", "https://")):
            import requests

            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        mlflow.set_tracking_uri(uri)
        mlflow.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(
            f"MLflow tracking store {uri!r} is unreachable ({type(err).__name__}: {err}). "
            "Start the server or set MLFLOW_TRACKING_URI to a reachable store "
            "(default: sqlite:///<repository>/mlflow.db)."
        ) from None
    return uri


# ----------------------------------------------------------------------------- the owner of a run


def _process_tags() -> dict[str, str]:
    """Host, pid and start time of this process: enough to tell later whether it is gone."""
    import psutil

    return {
        f"{TAG_PREFIX}host": socket.gethostname(),
        f"{TAG_PREFIX}pid": str(os.getpid()),
        f"{TAG_PREFIX}pid_start": repr(psutil.Process().create_time()),
    }


def process_alive(pid: int, start: float | None) -> bool:
    """Whether process ``pid`` of this host runs, and is the one that started at ``start``."""
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    return start is None or abs(created - start) < 1e-3


def close_stale_runs(client: Any, experiment_id: str) -> list[str]:
    """Close as ``FAILED`` the runs of ``experiment_id`` left ``RUNNING`` by a process of this host that is gone.

    A process killed with SIGKILL cannot end its run; the next stage of the same
    experiment does it (tag ``demar.closed``). Runs of other hosts are left alone.

    Returns:
        The ids of the runs closed.
    """
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_PREFIX}host` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags[f"{TAG_PREFIX}pid"])
            start = float(tags[f"{TAG_PREFIX}pid_start"])
        except (KeyError, ValueError):
            continue
        if process_alive(pid, start):
            continue
        client.set_tag(run.info.run_id, f"{TAG_PREFIX}closed", "its process was gone")
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(run.info.run_id)
    if closed:
        print(f"closed {len(closed)} MLflow run(s) left running by killed processes as FAILED")
    return closed


# ----------------------------------------------------------------------------- logging


_STOP = object()


class RunLogger:
    """Logging into one MLflow run that never blocks the work and never raises.

    Calls are queued and sent by a background thread (metrics in batches of
    ``flush_every`` values). The first failure turns the logger offline: one warning,
    then every call not sent (the failed one, the queued ones, later ones) is appended
    to the run's spool in :func:`unsynced_dir` for ``demar tracking sync``.

    Args:
        run_id: the MLflow run; None gives a logger that records nothing.
        flush_every: metric values buffered before a batch is queued.
        uri: the tracking store (default: :func:`tracking_uri`).
        meta: what the spool records about the run (stage, row, ...).
        queue_size: calls waiting for the sender before the run goes offline.
    """

    def __init__(
        self,
        run_id: str | None,
        flush_every: int = 200,
        *,
        uri: str | None = None,
        meta: Mapping[str, Any] | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.run_id = run_id
        self.flush_every = flush_every
        self.uri = uri
        self.meta = dict(meta or {})
        self._buffer: list[tuple[str, float, int, int]] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._offline = run_id is None
        self._disabled = run_id is None
        self._thread: threading.Thread | None = None
        self._current: Any = None
        self._spool_dir: Path | None = None

    @property
    def active(self) -> bool:
        """Whether calls still reach MLflow."""
        return not self._offline

    @property
    def spool(self) -> Path | None:
        """The folder holding what was not sent, or None while nothing was lost."""
        return self._spool_dir

    # ------------------------------------------------------------------ background sender

    def _put(self, item: tuple[Any, ...]) -> None:
        if self._disabled:
            return
        if self._offline:
            self._spool_item(item)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-{self.run_id}", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._go_offline(f"more than {self._queue.maxsize} calls waiting: the store is too slow")
            self._spool_item(item)

    def _send_loop(self) -> None:
        import mlflow

        _bound_http()
        client = mlflow.MlflowClient(self.uri)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._offline:
                self._spool_item(item)
                continue
            self._current = item
            try:
                self._send(client, item)
            except Exception as err:  # noqa: BLE001 - tracking must never stop the work
                self._go_offline(f"{item[0]} failed ({type(err).__name__}: {err})")
                self._spool_item(item)
            self._current = None

    def _send(self, client: Any, item: tuple[Any, ...]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, payload = item[0], item[1]
        if kind == "metrics":
            client.log_batch(self.run_id, metrics=[Metric(*m) for m in payload])
        elif kind == "params":
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in payload.items()])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "artifact":
            path, artifact_path = Path(payload), item[2]
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                client.log_artifact(self.run_id, str(path), artifact_path)
        elif kind == "file":  # bytes made in memory (an image, a dict): written, then logged
            name, data, artifact_path = payload, item[2], item[3]
            with _temporary_file(name, data) as path:
                client.log_artifact(self.run_id, str(path), artifact_path)
        elif kind == "end":
            client.set_terminated(self.run_id, payload)

    # ------------------------------------------------------------------ offline

    def _go_offline(self, reason: str) -> None:
        with self._lock:
            if self._offline:
                return
            self._offline = True
            self._spool_dir = unsynced_dir() / str(self.run_id)
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            record = {"run_id": self.run_id, "tracking_uri": self.uri or tracking_uri(), "reason": reason, **self.meta}
            from demar.io import write_json

            write_json(self._spool_dir / "run.json", record)
        warnings.warn(
            f"MLflow logging stopped: {reason}. The run goes on; its local files are complete and "
            f"the calls not sent are kept in {self._spool_dir} for `demar tracking sync`.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _spool_item(self, item: tuple[Any, ...]) -> None:
        """Append one unsent call to the spool (a line of ``calls.jsonl``; files beside it).

        An append-only log, not an atomic rewrite: a kill can only tear its last line,
        which the sync skips."""
        if self._disabled or self._spool_dir is None:
            return
        kind = item[0]
        with self._lock:
            if kind == "file":
                name, data, artifact_path = item[1], item[2], item[3]
                files = self._spool_dir / "files"
                files.mkdir(exist_ok=True)
                stored = files / f"{len(list(files.iterdir())):06d}-{name}"
                from demar.io import atomic_write_bytes

                atomic_write_bytes(stored, data)
                line = {"kind": "artifact", "payload": str(stored.resolve()), "artifact_path": artifact_path}
            elif kind == "artifact":
                line = {"kind": kind, "payload": str(Path(item[1]).resolve()), "artifact_path": item[2]}
            else:
                line = {"kind": kind, "payload": item[1]}
            with open(self._spool_dir / "calls.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------------ public calls

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer finite numeric metrics at ``step`` (default 0); queued in batches."""
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            if math.isfinite(v):
                self._buffer.append((k, v, ts, int(step or 0)))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Queue the buffered metrics now (without waiting for them to be sent)."""
        batch, self._buffer = self._buffer, []
        for i in range(0, len(batch), 1000):
            self._put(("metrics", batch[i : i + 1000]))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) params; values are cut to MLflow's length limit."""
        items = [(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._put(("params", dict(items[i : i + 100])))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        self._put(("tags", {k: str(v) for k, v in tags.items()}))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts (read when sent: keep it until the run ends)."""
        self._put(("artifact", str(path), artifact_path))

    def log_image(self, image: Any, name: str, step: int | None = None) -> None:
        """Log a PIL image or uint8 HxWx3 array as ``images/<name>`` (``<name>_<step>.png`` with a step)."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        fname = f"{name}_{step:08d}.png" if step is not None else f"{name}.png"
        buf = io.BytesIO()
        image.save(buf, format="png")
        self._put(("file", fname, buf.getvalue(), "images"))

    def log_dict(self, obj: Any, name: str) -> None:
        """Log a JSON-serialisable object as an artifact file ``name`` (a path inside the run's artifacts)."""
        folder, _, fname = name.rpartition("/")
        self._put(("file", fname, json.dumps(obj, indent=2).encode(), folder or None))

    def close(self, status: str | None = None, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Queue the buffered metrics and the run's end (``status``), and wait at most ``timeout`` seconds.

        What the sender has not sent by then is spooled, and the run goes offline."""
        if self._disabled:
            return
        self.flush()
        if status is not None:
            self._put(("end", status))
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._thread = None  # a later call starts a new sender
            return
        self._go_offline(f"the store did not take the run's last calls within {timeout:.0f} s")
        pending = [self._current] if self._current is not None else []
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(self._queue.get_nowait())
        for item in pending:
            if item is not _STOP:
                self._spool_item(item)


@contextlib.contextmanager
def _temporary_file(name: str, data: bytes) -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        yield path


# ----------------------------------------------------------------------------- a stage's run


def _experiment_id(client: Any, preset: str, uri: str) -> str:
    """The id of the preset's experiment, created (artifacts beside a sqlite store) if needed."""
    name = experiment_name(preset)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_file(uri)
        artifacts = (db.parent / "mlartifacts").as_uri() if db is not None else None
        with contextlib.suppress(Exception):  # a concurrent worker may create it first
            client.create_experiment(name, artifact_location=artifacts)
        exp = client.get_experiment_by_name(name)
    return exp.experiment_id


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    preset: str = "embedded",
    row: str | None = None,
    seed: int | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    enabled: bool = True,
    system_metrics: bool = False,
) -> Iterator[RunLogger]:
    """Open an MLflow run for one unit of work and yield its :class:`RunLogger`.

    Args:
        stage: the DVC stage (or work) name, e.g. ``"train"``; tagged ``demar.stage``.
        preset: the params preset; the experiment is ``demar-<preset>``.
        row: the ablation row, tagged ``demar.row``.
        seed: the seed, tagged ``demar.seed``.
        params: logged flattened.
        tags: extra tags (``mlflow.parentRunId`` makes the run a child).
        run_name: the run's name (default ``"<stage>[-<row>]"``).
        enabled: when False, yield a logger that records nothing.
        system_metrics: log CPU/GPU/memory system metrics.

    Raises:
        TrackingError: the tracking store cannot be reached or written (before any work).
    """
    if not enabled:
        yield RunLogger(None)
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = check_tracking()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    all_tags = {
        f"{TAG_PREFIX}stage": os.environ.get("DVC_STAGE", stage),
        f"{TAG_PREFIX}work": stage,
        f"{TAG_PREFIX}preset": preset,
        f"{TAG_PREFIX}repro_id": repro_id(),
        **{f"{TAG_PREFIX}{k}": v for k, v in git_state().items()},
        **_process_tags(),
    }
    if row is not None:
        all_tags[f"{TAG_PREFIX}row"] = row
    if seed is not None:
        all_tags[f"{TAG_PREFIX}seed"] = str(seed)
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    name = run_name or (f"{stage}-{row}" if row else stage)
    try:
        experiment = _experiment_id(client, preset, uri)
        close_stale_runs(client, experiment)
        run = client.create_run(experiment, run_name=name, tags=all_tags)
    except MlflowException as err:
        raise TrackingError(f"MLflow tracking store {uri!r} cannot be used: {err}") from None
    meta = {"stage": stage, "row": row, "preset": preset, "run_name": name}
    logger = RunLogger(run.info.run_id, uri=uri, meta=meta)
    monitor = None
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=uri)
        monitor.start()
    status = "FINISHED"
    try:
        if params:
            logger.log_params(params)
        yield logger
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if monitor is not None:  # its last flush may hang on a dead store: bounded
            stopper = threading.Thread(target=monitor.finish, daemon=True)
            stopper.start()
            stopper.join(CLOSE_TIMEOUT_S / 3)
        logger.close(status)
