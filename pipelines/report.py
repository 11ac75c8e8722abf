"""DVC stage ``report``: build the tables, figures and HTML page, and log them to MLflow."""

from __future__ import annotations

import os
import sys

from demar.tracking import stage_run
from pipelines import load_stage_params, run_stage
from reports.build import arg_parser, build_report


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__).parse_args(argv)
    if args.tracking_uri:  # the stage's own run goes to the store it reads
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    params = load_stage_params(args.params)
    cfg, preset = params.report, params.preset
    with stage_run("report", preset=preset, params={"report": cfg.model_dump()}, enabled=not args.no_mlflow) as run:
        result = build_report(
            params,
            args.metrics,
            args.samples,
            args.out,
            tracking_uri=args.tracking_uri,
            use_mlflow=not args.no_mlflow,
            studies_dir=args.studies,
        )
        run.log_artifact(args.out, "report")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(result.outputs)} files to {args.out}")
    return 0


if __name__ == "__main__":
    run_stage(main, "report")
