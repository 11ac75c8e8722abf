"""The ``demar`` command line: one subcommand per verb (``demar params``, ...).

Each subcommand registers itself on the parser with an ``_add_<name>`` function
and runs through the ``func`` default it sets; :func:`main` dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main", "params_table"]


def params_table(token_dim: int, seq_len: int, num_classes: int) -> list[dict[str, object]]:
    """Parameter counts of every registered size, for the MAR row and full De-MAR.

    Args:
        token_dim: token features d the counts assume.
        seq_len: tokens per image N the counts assume.
        num_classes: classes of the class embedding the counts assume.

    Returns:
        One dict per (size, row): ``size, row, backbone, diffusion_head, denoising_head,
        total`` (counts) and ``paper`` (millions, or ``None`` where the paper gives none).
    """
    from demar.model import ABLATION_ROWS, ModelConfig, count_params
    from demar.sizes import PAPER_PARAMS_M, SIZES

    rows = []
    for size in SIZES:
        for row in ("mar", "demar"):
            cfg = ModelConfig.from_size(
                size, token_dim=token_dim, seq_len=seq_len, num_classes=num_classes, **ABLATION_ROWS[row]
            )
            paper = PAPER_PARAMS_M.get(size, {}).get(row)
            rows.append({"size": size, "row": row, **count_params(cfg), "paper": paper})
    return rows


def _cmd_params(args: argparse.Namespace) -> int:
    rows = params_table(args.token_dim, args.seq_len, args.num_classes)
    print(f"parameters (millions) at N = {args.seq_len} tokens of d = {args.token_dim}, {args.num_classes} classes")
    header = (
        f"{'size':<6} {'row':<6} {'backbone':>9} {'diff.head':>9} {'de.head':>8} {'total':>9} {'paper':>7} {'diff':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        total = r["total"] / 1e6
        paper = r["paper"]
        paper_s = f"{paper:.0f}" if paper else "-"
        delta = f"{100 * (total - paper) / paper:+.2f}%" if paper else "-"
        print(
            f"{r['size']:<6} {r['row']:<6} {r['backbone'] / 1e6:>9.2f} {r['diffusion_head'] / 1e6:>9.2f} "
            f"{r['denoising_head'] / 1e6:>8.2f} {total:>9.2f} {paper_s:>7} {delta:>7}"
        )
    return 0


def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="parameter counts of every registered model size, by component")
    p.add_argument("--token-dim", type=int, default=16, help="token features d (default 16, KL-16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per image N (default 256)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes (default 1000, ImageNet)")
    p.set_defaults(func=_cmd_params)


def _cmd_preset(args: argparse.Namespace) -> int:
    from demar.params import apply_preset, list_presets

    if args.name is None:
        print("\n".join(list_presets()))
        return 0
    source = apply_preset(args.name, args.params)
    print(f"wrote {args.params} from {source.name}; `dvc repro` now runs the {args.name!r} preset")
    return 0


def _add_preset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preset", help="list presets, or validate one and write it over params.yaml")
    p.add_argument("name", nargs="?", default=None, help="a preset of presets/ (none: list them)")
    p.add_argument("--params", default="params.yaml", help="the params file to replace (default: %(default)s)")
    p.set_defaults(func=_cmd_preset)


def _add_study(sub: argparse._SubParsersAction) -> None:
    from demar.studies.cli import configure_parser

    configure_parser(sub.add_parser("study", help="Optuna studies: run or report one (studies/<name>.yaml)"))


def _cmd_tracking_sync(args: argparse.Namespace) -> int:
    from demar.tracking import unsynced_dir
    from demar.tracking_sync import sync_unsynced

    results = sync_unsynced(args.tracking_uri, args.dir)
    if not results:
        print(f"nothing to sync in {args.dir or unsynced_dir()}")
    for r in results:
        if r.error:
            print(f"run {r.run_id}: not synced, kept for a later try ({r.error})")
        else:
            print(f"run {r.run_id}: sent {r.metrics} metric values and {r.calls} other calls")
    return 1 if any(r.error for r in results) else 0


def _add_tracking(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tracking", help="MLflow tracking: replay what runs logged while the store was down")
    verbs = p.add_subparsers(dest="tracking_command", required=True, metavar="COMMAND")
    s = verbs.add_parser("sync", help="send the spooled calls of runs that lost their tracking store")
    s.add_argument("--tracking-uri", help="the store to replay into (default: the one each run logged to)")
    s.add_argument("--dir", help="the spool (default: $DEMAR_UNSYNCED_DIR or mlartifacts/unsynced)")
    s.set_defaults(func=_cmd_tracking_sync)


def _cmd_verify(args: argparse.Namespace) -> int:
    from demar.verify import format_report, verify

    checks = verify(args.root, args.baseline)
    print(format_report(checks, verbose=args.verbose))
    failed = [c.stage for c in checks if c.verdict not in ("identical", "within tolerance")]
    print(f"{len(checks) - len(failed)} of {len(checks)} stages reproduce {args.baseline}" + (
        f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="after `dvc repro`: compare every stage's outputs and metrics with a commit")
    p.add_argument("--baseline", default="HEAD", help="the commit whose dvc.lock and metrics are the reference "
                   "(default: %(default)s)")
    p.add_argument("--root", default=".", help="the repository (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every metric, not only the failing ones")
    p.set_defaults(func=_cmd_verify)


def _cmd_repro(args: argparse.Namespace) -> int:
    from demar.repro import main as repro_main

    try:
        return repro_main(args.root, args.targets, args.jobs, force=args.force, keep_going=args.keep_going)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _add_repro(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repro", help="dvc repro with several independent stages at once (same outputs and dvc.lock)")
    p.add_argument("targets", nargs="*", help="stages to bring up to date, with their upstream (default: all)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="stages at once; keep jobs x the stages' threads "
                   "at most the cores (default: %(default)s)")
    p.add_argument("-f", "--force", action="store_true", help="run every stage even if unchanged")
    p.add_argument("-k", "--keep-going", action="store_true", help="after a failure, run what does not depend on it")
    p.add_argument("--root", default=".", help="the repository (default: %(default)s)")
    p.set_defaults(func=_cmd_repro)


def build_parser() -> argparse.ArgumentParser:
    """The ``demar`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="demar", description="De-MAR reproducibility suite")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_params(sub)
    _add_preset(sub)
    _add_repro(sub)
    _add_study(sub)
    _add_tracking(sub)
    _add_verify(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``demar`` command.

    Args:
        argv: the arguments (default ``None``: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    from demar.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
