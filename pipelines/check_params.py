"""DVC stage ``check_params``: validate the whole params file before any stage runs.

``dvc repro`` deletes a stage's outputs before it runs the stage, and restores
stages from its run cache without running their code. So the checks that protect
the user's files and catch unusable params run here, in the first stage, which
depends on every key of ``params.yaml`` (and which ``prepare_data`` depends on): the
schema of every section, no rows at all, an image folder inside a DVC output, more
classes in the data than ``model.num_classes`` and an empty class folder. An error
is one line naming the key or folder, and ``dvc repro`` stops before anything is
deleted. Its output is not cached, so DVC never restores it without running it.

Writes ``--out`` (``{"preset", "valid": true}``): its content changes only with the
preset, so the stages after it re-run only for their own reasons.

``python -m pipelines.check_params [--params params.yaml] [--out metrics/params_check.json]``
"""

from __future__ import annotations

import argparse

from demar.data import check_classes
from demar.io import write_json
from pipelines import load_stage_params, run_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--out", default="metrics/params_check.json", help="record of the check (default: %(default)s)")
    args = p.parse_args(argv)

    params = load_stage_params(args.params)
    check_classes(params.data, params.model.num_classes)
    write_json(args.out, {"preset": params.preset, "valid": True})
    print(f"{args.params}: valid ({len(params.rows)} rows); wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_stage(main, "check_params")
