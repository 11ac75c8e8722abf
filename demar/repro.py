"""``dvc repro`` with several stages running at once (``demar repro --jobs N``).

DVC runs the stages of one ``dvc repro`` one after another. It does, however, release
its repository lock while a stage's command runs, and guards each stage's
dependencies and outputs with their own locks, so independent stages may run from
separate ``dvc repro`` processes at the same time. This scheduler walks the pipeline's
graph and starts ``dvc --wait-for-lock repro --single-item <stage>`` for every stage
whose upstream stages have finished, at most ``jobs`` at a time. Each waits for the
repository lock, which a process holds only while it checks a stage or records it in
``dvc.lock`` (without the wait, a stage that ends while another starts would fail to
record its finished work). Each stage is still run (or skipped
when unchanged) and recorded in ``dvc.lock`` by DVC itself, so the result is that of
``dvc repro``: the same commands, the same outputs, the same lock file.

Every stage pins its own CPU threads (``threads`` in ``dvc.yaml``), so ``jobs x threads``
should not exceed the cores: a stage whose threads are taken by another slows down
many times over. Each stage's output goes to ``<log_dir>/<stage>.log``; a failure
prints its tail and stops new stages from starting (``--keep-going`` carries on with
the stages that do not depend on it). With ``jobs > 1`` the stages' sqlite MLflow store
is created first when it does not exist (:func:`create_tracking_store`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StageResult", "create_tracking_store", "pipeline_graph", "run_parallel"]



@dataclass
class StageResult:
    """How one stage ended: ``status`` is ``"ran"``, ``"failed"`` or ``"skipped"`` (upstream failed)."""

    stage: str
    status: str
    seconds: float = 0.0
    log: Path | None = None


@dataclass
class _Running:
    stage: str
    process: subprocess.Popen
    log: Path
    started: float
    handle: object = field(default=None, repr=False)


def pipeline_graph(root: str | os.PathLike[str] = ".", targets: Sequence[str] = ()) -> dict[str, list[str]]:
    """``{stage: [stages it depends on]}`` in ``dvc.yaml`` order, limited to ``targets`` and their upstream.

    Raises:
        ValueError: a target names no stage and no ``foreach`` group of ``dvc.yaml``.
    """
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:  # stage names are relative to the working folder
        graph = repo.index.graph
        upstream = {stage.addressing: sorted(s.addressing for s in graph.successors(stage)) for stage in graph.nodes}
    if not targets:
        return upstream
    todo = []
    for target in targets:  # a stage, or a foreach group ("train" is every train@<row>)
        members = [target] if target in upstream else [s for s in upstream if s.startswith(f"{target}@")]
        if not members:
            raise ValueError(f"no stage {target!r} in dvc.yaml (stages: {', '.join(upstream)})")
        todo.extend(members)
    keep: set[str] = set()
    while todo:
        stage = todo.pop()
        if stage not in keep:
            keep.add(stage)
            todo.extend(upstream[stage])
    return {stage: deps for stage, deps in upstream.items() if stage in keep}


def create_tracking_store(root: str | os.PathLike[str]) -> Path | None:
    """Create the stages' sqlite MLflow store before stages run side by side; return it if created.

    Processes that all open a sqlite store which does not exist yet race to create its
    tables, and all but one fail. The store is the one the stages will use
    (``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` at ``root``); nothing is done for a
    server URI, an existing file, or ``tracking.enabled: false`` in ``root/params.yaml``.
    A store that cannot be created is left to the stages, whose checks name the problem.
    """
    import yaml

    root = Path(root)
    try:
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
        if not (params.get("tracking") or {}).get("enabled", True):
            return None
    except (OSError, yaml.YAMLError, AttributeError):
        return None  # the check_params stage reports a params file it cannot read
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    if db.exists():
        return None
    import mlflow

    with contextlib.suppress(Exception):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return db if db.exists() else None


def _downstream_counts(graph: dict[str, list[str]]) -> dict[str, int]:
    """Number of stages that depend on each stage, directly or not (the scheduling priority)."""
    below: dict[str, set[str]] = {stage: set() for stage in graph}
    for stage, upstream in graph.items():
        todo = list(upstream)
        seen: set[str] = set()
        while todo:
            up = todo.pop()
            if up in seen:
                continue
            seen.add(up)
            below[up].add(stage)
            todo.extend(graph[up])
    return {stage: len(s) for stage, s in below.items()}


def run_parallel(
    graph: dict[str, list[str]],
    *,
    jobs: int,
    root: str | os.PathLike[str] = ".",
    log_dir: str | os.PathLike[str] = ".dvc/tmp/repro",
    force: bool = False,
    keep_going: bool = False,
    command: Callable[[str], list[str]] | None = None,
    echo: Callable[[str], None] = print,
    poll_s: float = 0.5,
) -> list[StageResult]:
    """Run every stage of ``graph`` after its upstream stages, ``jobs`` at a time.

    Args:
        graph: ``{stage: [upstream stages]}`` (see :func:`pipeline_graph`).
        jobs: stages running at once (at least 1).
        root: the repository the commands run in.
        log_dir: where each stage's output goes, ``<stage>.log`` (relative to ``root``).
        force: run every stage even when DVC finds it unchanged (``dvc repro --force``).
        keep_going: after a failure, go on with the stages that do not depend on it.
        command: ``stage -> argv`` (default ``dvc --wait-for-lock repro --single-item [--force] <stage>``).
        echo: where progress lines go.
        poll_s: seconds between checks of the running stages.

    Returns:
        One :class:`StageResult` per stage, in the order they ended.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    root = Path(root)
    logs = root / log_dir
    logs.mkdir(parents=True, exist_ok=True)
    if command is None:

        def command(stage: str) -> list[str]:
            force_flag = ["--force"] if force else []
            return [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", *force_flag, stage]

    # One reproduction id for the MLflow runs of every stage, as under one `dvc repro`.
    from demar.tracking import repro_id

    env = {**os.environ, "DEMAR_REPRO_ID": repro_id()}
    if jobs > 1:
        create_tracking_store(root)
    order = {stage: i for i, stage in enumerate(graph)}
    priority = _downstream_counts(graph)
    pending = set(graph)
    done: set[str] = set()
    failed: set[str] = set()
    running: list[_Running] = []
    results: list[StageResult] = []
    total = len(graph)
    start = time.monotonic()

    def launch(stage: str) -> _Running:
        log = logs / f"{stage.replace('/', '_')}.log"
        handle = open(log, "w")  # noqa: SIM115 (closed when the stage ends)
        proc = subprocess.Popen(command(stage), cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT)
        return _Running(stage, proc, log, time.monotonic(), handle)

    def blocked(stage: str) -> bool:
        return any(up in failed or up in blocked_set for up in graph[stage])

    blocked_set: set[str] = set()
    stop = False
    try:
        while pending or running:
            # Stages whose upstream failed are skipped; the rest start when ready.
            for stage in sorted(pending, key=order.get):
                if blocked(stage):
                    pending.discard(stage)
                    blocked_set.add(stage)
                    results.append(StageResult(stage, "skipped"))
            ready = [s for s in pending if all(up in done for up in graph[s])]
            ready.sort(key=lambda s: (-priority[s], order[s]))
            while ready and len(running) < jobs and not stop:
                stage = ready.pop(0)
                pending.discard(stage)
                running.append(launch(stage))
                echo(f"[{len(results) + len(running)}/{total}] start {stage}")
            if not running:
                if pending and (stop or not ready):
                    for stage in sorted(pending, key=order.get):
                        results.append(StageResult(stage, "skipped"))
                    pending.clear()
                continue
            time.sleep(poll_s)
            for job in list(running):
                code = job.process.poll()
                if code is None:
                    continue
                running.remove(job)
                job.handle.close()
                seconds = time.monotonic() - job.started
                if code == 0:
                    done.add(job.stage)
                    results.append(StageResult(job.stage, "ran", seconds, job.log))
                    echo(f"[{len(results)}/{total}] done  {job.stage} ({seconds:.0f} s)")
                else:
                    failed.add(job.stage)
                    results.append(StageResult(job.stage, "failed", seconds, job.log))
                    tail = job.log.read_text(errors="replace").splitlines()[-20:]
                    echo(f"[{len(results)}/{total}] FAILED {job.stage} (exit {code}); the end of {job.log}:")
                    for line in tail:
                        echo(f"    {line}")
                    stop = stop or not keep_going
    finally:
        for job in running:  # interrupted: stop the stages still running
            job.process.terminate()
            job.process.wait()
            job.handle.close()
    echo(
        f"{sum(r.status == 'ran' for r in results)} of {total} stages ran or were up to date, "
        f"{len(failed)} failed, {sum(r.status == 'skipped' for r in results)} not started "
        f"({time.monotonic() - start:.0f} s)"
    )
    return results


def main(
    root: str,
    targets: Sequence[str],
    jobs: int,
    *,
    force: bool = False,
    keep_going: bool = False,
) -> int:
    """``demar repro``: the exit status is 1 when a stage failed or was not started."""
    graph = pipeline_graph(root, targets)
    results = run_parallel(graph, jobs=jobs, root=root, force=force, keep_going=keep_going)
    sys.stdout.flush()
    return 0 if all(r.status == "ran" for r in results) else 1
