"""DVC stage ``train@<row>``: train one ablation row on the cached latents.

Reads ``params.yaml``: ``preset``, ``model`` (knobs shared by every row),
``rows.<row>`` (``ablation``, ``size``, ``seed``), ``train`` and ``tracking``.
Every value is validated before any work; an invalid one is an error naming its
key. The output folders are checked for writability and the MLflow store for
reachability next (either failing is an error before training). Then
:func:`demar.train.train` runs inside one MLflow run of the experiment
``demar-<preset>`` (params = the resolved configs, flattened; tags for the git
commit, dirty tree, DVC stage, row and seed; system metrics).

Inputs: ``data/latents``, for text-conditioned rows ``data/captions/train``, and,
for the sample grids, ``models/tokenizer.pt`` (optional). Outputs: ``models/<row>/`` (``model.pt``, ``checkpoints/last.pt``,
``metrics.jsonl``) and ``metrics/train/<row>.json``. A killed run resumes from its
last checkpoint when started again (declare ``models/<row>`` ``persist: true``) if
the params and the training code are unchanged; otherwise it starts afresh.

Single process: ``python -m pipelines.train --row demar``. Several processes or
nodes: ``torchrun --nproc_per_node 8 -m pipelines.train --row demar`` (see
:mod:`demar.distributed`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from demar.io import ensure_writable, remove_stale_temporaries, write_json
from demar.params import Params
from demar.tracking import check_tracking, stage_run
from demar.train import train
from pipelines import load_stage_params, run_stage



def resolve(params: Params, row_name: str) -> dict[str, Any]:
    """The configs of row ``row_name``: ``{"preset", "row", "model", "train", "tracking"}``."""
    row = params.row(row_name)
    return {
        "preset": params.preset,
        "row": row,
        "model": params.row_model(row_name),
        "train": params.row_train(row_name),
        "tracking": params.tracking,
    }


def tokenizer_decoder(path: Path, model_cfg: Any, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokens [B, N, d] -> images [B, 3, H, W]`` through the tokenizer at ``path``."""
    from demar.model import decode_tokens
    from demar.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(path, map_location=device)

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        return decode_tokens(tokens, tokenizer, model_cfg)  # [B, 3, H, W]

    return decode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", required=True, help="the row of params.yaml (rows.<row>)")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--latents", default="data/latents", help="latent cache (default: %(default)s)")
    p.add_argument("--captions", default="data/captions/train", help="caption cache of text-conditioned rows "
                   "(default: %(default)s)")
    p.add_argument("--tokenizer", default="models/tokenizer.pt", help="for sample grids (default: %(default)s)")
    p.add_argument("--models", default="models", help="writes <models>/<row>/ (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/train", help="writes <metrics>/<row>.json (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    cfg = resolve(load_stage_params(args.params), args.row)
    row, model_cfg, train_cfg, tracking = cfg["row"], cfg["model"], cfg["train"], cfg["tracking"]
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:  # a read-only output is an error now, not after training
        ensure_writable(Path(args.models) / args.row, args.metrics)
        remove_stale_temporaries(args.metrics)  # the row's folder is cleaned by train()
    track = tracking.enabled and is_main
    if track:
        check_tracking()

    decode = None
    tokenizer_file = Path(args.tokenizer)
    if train_cfg.sample_every and track and tokenizer_file.is_file():
        from demar.distributed import resolve_device

        decode = tokenizer_decoder(
            tokenizer_file, model_cfg, resolve_device(train_cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        )

    resolved = {
        "preset": cfg["preset"],
        "row": {"name": args.row, **row.model_dump(mode="json")},
        "model": model_cfg.model_dump(mode="json"),
        "train": {**train_cfg.model_dump(mode="json"), "lr": train_cfg.lr},
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    with stage_run(
        "train",
        preset=cfg["preset"],
        row=args.row,
        seed=row.seed,
        params=resolved,
        enabled=track,
        system_metrics=tracking.system_metrics,
    ) as run:
        result = train(
            model_cfg,
            train_cfg,
            latents_dir=args.latents,
            captions_dir=args.captions if model_cfg.context == "text" else None,
            out_dir=Path(args.models) / args.row,
            run=run if track else None,
            decode=decode,
            progress=not args.no_progress,
        )
        if is_main:
            m = result.metrics
            record = {
                "row": args.row,
                "ablation": row.ablation,
                "size": row.size,
                "seed": row.seed,
                **{k: m[k] for k in ("steps", "loss", "loss_diffusion", "loss_refinement", "loss_assessment")},
                **{k: m[k] for k in ("params_total", "params_by_component", "tokens_per_s", "steps_per_s", "wall_s")},
            }
            out_file = Path(args.metrics) / f"{args.row}.json"
            write_json(out_file, record)
            if track:
                run.log_metrics({f"final/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
                run.log_artifact(result.metrics_path)
            print(
                f"trained {args.row}: {m['steps']} steps, loss {m['loss']:.4f}; wrote {result.model_path}, {out_file}"
            )
    return 0


if __name__ == "__main__":
    run_stage(main, "train")
