"""DVC stage ``prepare_data``: generate the embedded shapes, or scan and index an image folder.

Reads ``params.yaml``: ``data`` (``kind``, ``embedded`` or ``imagenet``), ``preset``
and ``tracking``, and validates the whole file: this stage runs first and always
runs again when params change, while later stages restored from DVC's run cache
skip their code, so every check of the params that needs no output is made here
(the row schema, no rows at all, an image folder inside a DVC output, more classes
in the data than ``model.num_classes``, an empty class folder). Writes ``data/<kind>/`` (``train/``, ``reference/``,
``manifest.json``) and ``metrics/data.json`` (counts, classes, skipped images,
wall time). With ``data.kind: imagenet`` every image is decoded once here; bad
ones stop the stage or are skipped (and counted) as ``data.imagenet.on_bad_image`` says.

``python -m pipelines.prepare_data [--out data/embedded] [--metrics metrics/data.json]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demar.data import check_classes, prepare
from demar.io import write_json
from demar.tracking import stage_run
from pipelines import add_threads_argument, apply_threads, load_stage_params, run_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--out", default=None, help="prepared data folder (default: data/<data.kind>)")
    p.add_argument("--metrics", default="metrics/data.json", help="metrics file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)

    params = load_stage_params(args.params)
    cfg, preset, tracking = params.data, params.preset, params.tracking
    check_classes(cfg, params.model.num_classes)  # lists class folders only: before any work
    out = Path(args.out or f"data/{cfg.kind}")
    with stage_run(
        "prepare_data", preset=preset, params={"data": cfg.model_dump(mode="json")}, enabled=tracking.enabled
    ) as run:
        metrics = prepare(cfg, out, progress=not args.no_progress)
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(args.metrics)
        if cfg.kind == "embedded" and run.active:
            from demar.data.embedded import EmbeddedDataset

            ds = EmbeddedDataset(out / "train", output="uint8")
            rows, r = min(8, len(ds) // 8), ds.resolution
            if rows:
                grid = ds.images[: rows * 8].reshape(rows, 8, 3, r, r).transpose(0, 3, 1, 4, 2)  # [rows, R, 8, R, 3]
                run.log_image(grid.reshape(rows * r, 8 * r, 3), "train_images")
                run.log_dict({"captions": ds.captions[: rows * 8]}, "train_captions.json")
    print(
        f"prepared {cfg.kind}: {metrics['num_train']} train / {metrics['num_reference']} reference images, "
        f"{metrics['num_skipped']} skipped, {metrics['wall_s']:.1f} s; wrote {out}, {args.metrics}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main, "prepare_data")
