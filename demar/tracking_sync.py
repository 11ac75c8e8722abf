"""Replaying into MLflow what runs spooled while their tracking store was down (``demar tracking sync``).

:class:`demar.tracking.RunLogger` appends every call it could not send to
``<unsynced_dir>/<run id>/calls.jsonl`` (files beside it) and describes the run in
``run.json``. The sync sends those calls to the run, skipping metric values the
store already holds, sets the run's final status and deletes the spool.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demar.tracking import TAG_PREFIX, check_tracking, unsynced_dir

__all__ = ["SyncResult", "sync_unsynced"]


@dataclass
class SyncResult:
    """What :func:`sync_unsynced` did for one spooled run.

    Attributes:
        run_id: the run.
        metrics: metric values sent (those the store already held are skipped).
        calls: other calls replayed (params, tags, artifacts, the end).
        error: why the run could not be synced (its spool is kept), or None.
    """

    run_id: str
    metrics: int = 0
    calls: int = 0
    error: str | None = None


def _read_calls(path: Path) -> list[dict[str, Any]]:
    calls = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a kill can tear the last line
                calls.append(json.loads(line))
    return calls


def _sync_one(folder: Path, uri: str | None) -> SyncResult:
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    record = json.loads((folder / "run.json").read_text())
    result = SyncResult(record["run_id"])
    client = mlflow.MlflowClient(check_tracking(uri or record["tracking_uri"]))
    run = client.get_run(result.run_id)
    calls = _read_calls(folder / "calls.jsonl")
    keys = {m[0] for c in calls if c["kind"] == "metrics" for m in c["payload"]}
    held = {(k, m.step) for k in keys for m in client.get_metric_history(result.run_id, k)}
    end = None
    for call in calls:
        kind, payload = call["kind"], call["payload"]
        if kind == "metrics":
            new = [Metric(*m) for m in payload if (m[0], m[3]) not in held]
            held.update((m.key, m.step) for m in new)
            if new:
                client.log_batch(result.run_id, metrics=new)
            result.metrics += len(new)
            continue
        if kind == "params":
            new = {k: v for k, v in payload.items() if k not in run.data.params}
            client.log_batch(result.run_id, params=[Param(k, v) for k, v in new.items()])
        elif kind == "tags":
            client.log_batch(result.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "artifact" and Path(payload).exists():
            if Path(payload).is_dir():
                client.log_artifacts(result.run_id, payload, call.get("artifact_path"))
            else:
                client.log_artifact(result.run_id, payload, call.get("artifact_path"))
        elif kind == "end":
            end = payload
            continue
        result.calls += 1
    client.set_tag(result.run_id, f"{TAG_PREFIX}synced", record.get("reason", "true"))
    if end is not None:
        client.set_terminated(result.run_id, end)
        result.calls += 1
    return result


def sync_unsynced(uri: str | None = None, folder: str | os.PathLike[str] | None = None) -> list[SyncResult]:
    """Replay into MLflow what runs that lost their store spooled, then delete each replayed spool.

    Metric values already in the store (same key and step) are skipped, so a sync
    interrupted halfway can simply be run again.

    Args:
        uri: the store to replay into (default: the one each run was logging to).
        folder: the spool (default :func:`unsynced_dir`).
    """
    root = Path(folder) if folder is not None else unsynced_dir()
    results = []
    for spool in sorted(p for p in root.glob("*") if (p / "run.json").is_file()):
        try:
            result = _sync_one(spool, uri)
        except Exception as err:  # noqa: BLE001 - one run that cannot be synced must not stop the others
            results.append(SyncResult(spool.name, error=f"{type(err).__name__}: {err}"))
            continue
        shutil.rmtree(spool)
        results.append(result)
    return results
