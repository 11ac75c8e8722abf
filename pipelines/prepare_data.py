"""DVC stage ``prepare_data``: generate the embedded shapes, or scan and index an image folder.

Reads ``params.yaml``: ``data`` (``kind``, ``embedded`` or ``imagenet``), ``preset``
and ``tracking``. Writes ``data/<kind>/`` (``train/``, ``reference/``,
``manifest.json``) and ``metrics/data.json`` (counts, classes, skipped images,
wall time). With ``data.kind: imagenet`` every image is decoded once here; bad
ones stop the stage or are skipped (and counted) as ``data.imagenet.on_bad_image`` says.

``python -m pipelines.prepare_data [--out data/embedded] [--metrics metrics/data.json]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from demar.config import load_section, load_yaml
from demar.data import DataConfig, prepare
from demar.io import write_json
from demar.tracking import stage_run
from pipelines import add_threads_argument, apply_threads, stage_settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--out", default=None, help="prepared data folder (default: data/<data.kind>)")
    p.add_argument("--metrics", default="metrics/data.json", help="metrics file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)

    cfg = load_section(args.params, "data", DataConfig)
    preset, tracking = stage_settings(load_yaml(args.params), args.params)
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
    sys.exit(main())
