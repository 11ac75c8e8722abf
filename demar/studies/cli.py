"""``demar study run|report NAME`` (also ``python -m demar.studies``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from demar.config import ConfigError
from demar.studies.config import load_study_config
from demar.studies.report import StudyReport, report_study
from demar.studies.runner import run_study

__all__ = ["configure_parser", "main"]


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
    parser = argparse.ArgumentParser(prog="python -m demar.studies", description="Optuna studies of studies/<name>.yaml")
    configure_parser(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))

