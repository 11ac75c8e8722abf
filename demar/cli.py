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
    from demar.studies import configure_parser

    configure_parser(sub.add_parser("study", help="Optuna studies: run or report one (studies/<name>.yaml)"))


def build_parser() -> argparse.ArgumentParser:
    """The ``demar`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="demar", description="De-MAR reproducibility suite")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_params(sub)
    _add_preset(sub)
    _add_study(sub)
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
