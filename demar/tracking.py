"""MLflow tracking shared by every stage, study and training run.

* The tracking URI defaults to ``sqlite:///<repository root>/mlflow.db`` (artifacts
  beside it in ``mlartifacts/``); ``MLFLOW_TRACKING_URI`` overrides it.
* :func:`stage_run` opens a run tagged with the DVC stage, ablation row, seed, git
  commit, dirty flag and the id of the current ``dvc repro`` (one id shared by all
  stages of one reproduction, so the MLflow UI can group them).
* An unreachable tracking store at start is a :class:`TrackingError` before any work.
  Afterwards, a tracking failure never stops the work: it is reported once as a
  warning and the run goes on; the stage's own metric files remain the record.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RunLogger",
    "TrackingError",
    "check_tracking",
    "experiment_name",
    "flatten",
    "git_state",
    "repo_root",
    "repro_id",
    "stage_run",
    "tracking_uri",
]

TAG_PREFIX = "demar."


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


def check_tracking(uri: str | None = None) -> str:
    """Raise :class:`TrackingError` unless the tracking store at ``uri`` answers; return the URI."""
    import mlflow

    uri = uri or tracking_uri()
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


class RunLogger:
    """Logging into one MLflow run that never raises after the run has started.

    Metrics are buffered and sent in batches (``flush_every`` metric values); a failing
    call is reported once as a warning and later calls are dropped.
    """

    def __init__(self, run_id: str | None, flush_every: int = 200) -> None:
        self.run_id = run_id
        self.flush_every = flush_every
        self._buffer: list[Any] = []
        self._failed = run_id is None

    @property
    def active(self) -> bool:
        """Whether calls still reach MLflow."""
        return not self._failed

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never kill the work
            self._failed = True
            warnings.warn(
                f"MLflow {what} failed ({type(err).__name__}: {err}); "
                "tracking is off for the rest of this run, local metric files go on.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _client(self):
        import mlflow

        return mlflow.MlflowClient()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer finite numeric metrics at ``step`` (default 0); sent in batches."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            if math.isfinite(v):
                self._buffer.append(Metric(k, v, ts, int(step or 0)))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics now."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        for i in range(0, len(batch), 1000):
            self._guard("log_batch", lambda b=batch[i : i + 1000]: self._client().log_batch(self.run_id, metrics=b))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) params; values are cut to MLflow's length limit."""
        flat = flatten(params)
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._guard("log_params", lambda b=items[i : i + 100]: self._client().log_batch(self.run_id, params=b))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._guard("set_tags", lambda: self._client().log_batch(self.run_id, tags=items))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self._guard("log_artifacts", lambda: self._client().log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._guard("log_artifact", lambda: self._client().log_artifact(self.run_id, str(path), artifact_path))

    def log_image(self, image: Any, name: str, step: int | None = None) -> None:
        """Log a PIL image or uint8 HxWx3 array as ``images/<name>`` (``<name>_<step>.png`` with a step)."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        fname = f"{name}_{step:08d}.png" if step is not None else f"{name}.png"
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / fname
            image.save(p)
            self.log_artifact(p, "images")

    def log_dict(self, obj: Any, name: str) -> None:
        """Log a JSON-serialisable object as an artifact file ``name``."""
        self._guard("log_dict", lambda: self._client().log_dict(self.run_id, obj, name))


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
    nested: bool = False,
    enabled: bool = True,
    system_metrics: bool = False,
) -> Iterator[RunLogger]:
    """Open an MLflow run for one unit of work and yield a :class:`RunLogger`.

    Args:
        stage: the DVC stage (or work) name, e.g. ``"train"``; tagged ``demar.stage``.
        preset: the params preset; the experiment is ``demar-<preset>`` (default ``"embedded"``).
        row: the ablation row, tagged ``demar.row`` (default None).
        seed: the seed, tagged ``demar.seed`` (default None).
        params: logged flattened (default None).
        tags: extra tags (default None).
        run_name: the run's name (default ``"<stage>[-<row>]"``).
        nested: open as a child of the active run (default False).
        enabled: when False, yield a logger that records nothing (default True).
        system_metrics: log CPU/GPU/memory system metrics (default False).

    Raises:
        TrackingError: the tracking store cannot be reached (before any work).
    """
    if not enabled:
        yield RunLogger(None)
        return
    import mlflow

    uri = check_tracking()
    mlflow.set_tracking_uri(uri)
    exp = experiment_name(preset)
    if mlflow.get_experiment_by_name(exp) is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        with contextlib.suppress(Exception):  # a concurrent worker may create it first
            mlflow.create_experiment(exp, artifact_location=artifacts)
    mlflow.set_experiment(exp)
    all_tags = {
        f"{TAG_PREFIX}stage": os.environ.get("DVC_STAGE", stage),
        f"{TAG_PREFIX}work": stage,
        f"{TAG_PREFIX}preset": preset,
        f"{TAG_PREFIX}repro_id": repro_id(),
        **{f"{TAG_PREFIX}{k}": v for k, v in git_state().items()},
    }
    if row is not None:
        all_tags[f"{TAG_PREFIX}row"] = row
    if seed is not None:
        all_tags[f"{TAG_PREFIX}seed"] = str(seed)
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    name = run_name or (f"{stage}-{row}" if row else stage)
    run = mlflow.start_run(run_name=name, nested=nested, tags=all_tags, log_system_metrics=system_metrics)
    logger = RunLogger(run.info.run_id)
    status = "FINISHED"
    try:
        if params:
            logger.log_params(params)
        yield logger
    except BaseException:
        status = "FAILED"
        raise
    finally:
        logger.flush()
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)
