"""DVC stage ``train_tokenizer``: train the embedded tokenizer (or load KL-16) and measure it.

Reads ``params.yaml``: ``tokenizer`` (``source``, ``architecture``, ``train``, ...),
``data`` (kind and resolution), ``preset`` and ``tracking``. With ``tokenizer.source:
train`` a small KL autoencoder is trained on ``data/<kind>/train`` and its latent
scale computed (1/std of the training latents); with ``checkpoint`` the official
KL-16 weights are loaded from ``tokenizer.checkpoint`` with the scale
``tokenizer.checkpoint_scale``. Either way the reconstruction PSNR on the held-out
split is measured. Writes ``models/tokenizer.pt`` (weights, config and scale in one
file) and ``metrics/tokenizer.json``. A killed training resumes from
``--resume`` (removed after success).

``python -m pipelines.train_tokenizer [--data data/embedded] [--out models/tokenizer.pt]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demar.io import write_json
from demar.tokenizer_train import build_tokenizer, reconstruction_grid, reference_images
from demar.tracking import stage_run
from pipelines import add_threads_argument, apply_threads, load_stage_params, run_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--data", default=None, help="prepared data folder (default: data/<data.kind>)")
    p.add_argument("--out", default="models/tokenizer.pt", help="tokenizer bundle (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/tokenizer.json", help="metrics file (default: %(default)s)")
    p.add_argument(
        "--resume",
        default="models/tokenizer.resume.pt",
        help="training resume file, deleted after success (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)

    config = load_stage_params(args.params)
    data_cfg, cfg, preset, tracking = config.data, config.tokenizer, config.preset, config.tracking
    data_dir = Path(args.data or f"data/{data_cfg.kind}")
    params = {"tokenizer": cfg.model_dump(mode="json"), "data.kind": data_cfg.kind}
    with stage_run(
        "train_tokenizer",
        preset=preset,
        params=params,
        enabled=tracking.enabled,
        system_metrics=tracking.system_metrics,
    ) as run:
        tokenizer, metrics = build_tokenizer(
            cfg,
            data_cfg,
            data_dir,
            resume=args.resume,
            progress=not args.no_progress,
            on_log=lambda row: run.log_metrics(
                {f"train/{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"])
            ),
        )
        tokenizer.save(args.out)
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(args.metrics)
        ref = reference_images(data_cfg, data_dir, 32)
        if ref is not None:
            run.log_image(reconstruction_grid(tokenizer, ref[: len(ref) // 8 * 8]), "reconstructions")
    Path(args.resume).unlink(missing_ok=True)
    psnr = "n/a" if metrics["psnr"] is None else f"{metrics['psnr']:.2f} dB"
    print(
        f"tokenizer ({metrics['source']}): scale {metrics['scale']:.4f}, held-out PSNR {psnr}, "
        f"{metrics['wall_s']:.1f} s; wrote {args.out}, {args.metrics}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main, "train_tokenizer")
