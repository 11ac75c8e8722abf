"""DVC stage ``encode_captions``: cache the text encoder's token states of every caption, once.

Reads ``params.yaml``: ``captions`` (the encoder, shard and batch sizes, dtype,
device), ``data``, ``preset`` and ``tracking``. Reads the prepared splits
``data/<kind>/{train,reference}``; writes, per split, a caption cache
``data/captions/<split>/`` (shards, the null caption's encoding, ``manifest.json``;
see :mod:`demar.captions`) and ``images.json`` (for each image, the indices of its
captions), and ``metrics/captions.json``. Training and sampling read the states from
the cache and never run the encoder. With ``captions: null`` (the class-conditional
presets) it only writes ``data/captions/unused.json``, so one DAG serves both. A killed run keeps its finished shards and
continues from them when started again (declare ``data/captions`` ``persist: true``).

``python -m pipelines.encode_captions [--data data/embedded] [--out data/captions]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demar.captions import encode_captions
from demar.data import SPLITS, split_captions, split_fingerprint
from demar.distributed import resolve_device
from demar.io import write_json
from demar.text_encoders import build_text_encoder
from demar.tracking import stage_run
from pipelines import add_threads_argument, apply_threads, load_stage_params, run_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--data", default=None, help="prepared data folder (default: data/<data.kind>)")
    p.add_argument("--out", default="data/captions", help="caption caches, one per split (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/captions.json", help="metrics file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)

    params = load_stage_params(args.params)
    cfg, data_cfg = params.captions, params.data
    if cfg is None:  # a class-conditional preset: the stage leaves a marker, so the DAG is the same for both
        write_json(Path(args.out) / "unused.json", {"reason": "captions: null (class-conditional models)"})
        write_json(args.metrics, {"encoder": None})
        print(f"captions: null, nothing to encode; wrote {args.out}/unused.json")
        return 0
    data_dir = Path(args.data or f"data/{data_cfg.kind}")
    splits = {split: split_captions(data_cfg, data_dir, split) for split in SPLITS}  # a data error before any work
    with stage_run(
        "encode_captions",
        preset=params.preset,
        params={"captions": cfg.model_dump(mode="json")},
        enabled=params.tracking.enabled,
        system_metrics=params.tracking.system_metrics,
    ) as run:
        encoder = build_text_encoder(cfg.encoder, key="captions.encoder").to(resolve_device(cfg.device))
        metrics: dict[str, float | int | str] = {"encoder": cfg.encoder.kind, "max_length": cfg.encoder.max_length}
        for split, (captions, images) in splits.items():
            out = Path(args.out) / split
            result = encode_captions(
                encoder,
                captions,
                out,
                cfg,
                source={"kind": data_cfg.kind, "split": split, **split_fingerprint(data_dir, split)},
                progress=not args.no_progress,
            )
            write_json(out / "images.json", images)
            metrics.update({
                f"{split}_captions": result.manifest["num_items"],
                f"{split}_images": len(images),
                f"{split}_reused_shards": result.reused_shards,
                f"{split}_wall_s": result.wall_s,
            })  # fmt: skip
            print(f"{split}: {result.manifest['num_items']} captions ({result.reused_shards} shards reused) -> {out}")
        metrics["width"] = encoder.width
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(args.metrics)
    return 0


if __name__ == "__main__":
    run_stage(main, "encode_captions")
