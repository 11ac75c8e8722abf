"""DVC stage ``extract_latents``: cache the posterior moments of every training image and its flip.

Reads ``params.yaml``: ``latents`` (shard size, batch size, dtype, workers, device),
``data`` (kind, resolution), ``preset`` and ``tracking``. Reads ``models/tokenizer.pt``
and ``data/<kind>/train``; writes ``data/latents/`` (``shard_*.pt`` and
``manifest.json``, with the tokenizer's latent scale) and ``metrics/latents.json``.
A killed run keeps its finished shards and continues from them when started again
(declare ``data/latents`` ``persist: true``; a cache made for another tokenizer or
data set is discarded automatically).

``python -m pipelines.extract_latents [--data data/embedded] [--out data/latents]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demar.data import open_split, split_fingerprint
from demar.distributed import resolve_device
from demar.io import write_json
from demar.latents import extract_latents
from demar.tokenizer import Tokenizer, file_sha256
from demar.tracking import stage_run
from pipelines import add_threads_argument, apply_threads, load_stage_params, run_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--data", default=None, help="prepared data folder (default: data/<data.kind>)")
    p.add_argument("--tokenizer", default="models/tokenizer.pt", help="tokenizer bundle (default: %(default)s)")
    p.add_argument("--out", default="data/latents", help="latent cache folder (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/latents.json", help="metrics file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)

    params = load_stage_params(args.params)
    data_cfg, cfg, preset, tracking = params.data, params.latents, params.preset, params.tracking
    data_dir = Path(args.data or f"data/{data_cfg.kind}")
    with stage_run(
        "extract_latents",
        preset=preset,
        params={"latents": cfg.model_dump(mode="json")},
        enabled=tracking.enabled,
        system_metrics=tracking.system_metrics,
    ) as run:
        tokenizer = Tokenizer.load(args.tokenizer, map_location=resolve_device(cfg.device))
        dataset = open_split(data_cfg, data_dir, "train")
        result = extract_latents(
            tokenizer,
            dataset,
            args.out,
            cfg,
            tokenizer_sha256=file_sha256(args.tokenizer),
            num_classes=dataset.num_classes,
            source={"kind": data_cfg.kind, **split_fingerprint(data_dir, "train")},
            progress=not args.no_progress,
        )
        m = result.manifest
        metrics = {
            "num_items": m["num_items"],
            "num_shards": m["num_shards"],
            "reused_shards": result.reused_shards,
            "moments_shape": m["moments_shape"],
            "dtype": m["dtype"],
            "scale": m["scale"],
            "num_skipped": len(getattr(dataset, "skipped", [])),
            "bytes": sum((Path(args.out) / e["file"]).stat().st_size for e in m["shards"]),
            "wall_s": result.wall_s,
            "images_per_s": result.written_items / result.wall_s,
        }
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(args.metrics)
    print(
        f"extracted {m['num_items']} latents in {m['num_shards']} shards ({result.reused_shards} reused), "
        f"{result.wall_s:.1f} s; wrote {args.out}, {args.metrics}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main, "extract_latents")
