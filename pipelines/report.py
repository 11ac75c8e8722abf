"""DVC stage ``report``: build the tables, figures and HTML page, and log them to MLflow."""

from __future__ import annotations

import os
import sys

from demar.config import load_yaml, validate
from demar.tracking import stage_run
from reports.build import ReportConfig, arg_parser, build_report, preset_of


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__).parse_args(argv)
    if args.tracking_uri:  # the stage's own run goes to the store it reads
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    params = load_yaml(args.params)
    cfg = validate(ReportConfig, params.get("report"), source=args.params, prefix="report")
    preset = preset_of(params)
    with stage_run("report", preset=preset, params={"report": cfg.model_dump()}, enabled=not args.no_mlflow) as run:
        result = build_report(
            args.params,
            args.metrics,
            args.samples,
            args.out,
            tracking_uri=args.tracking_uri,
            use_mlflow=not args.no_mlflow,
        )
        run.log_artifact(args.out, "report")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(result.outputs)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
