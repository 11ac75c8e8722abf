"""DVC stage ``train@<row>``: train one ablation row on the cached latents.

Reads ``params.yaml``: ``preset``, ``model`` (knobs shared by every row),
``rows.<row>`` (``ablation``, ``size``, ``seed``), ``train`` and ``tracking``.
Every value is validated before any work; an invalid one is an error naming its
key. The MLflow store is checked next (an unreachable store is an error before
training). Then :func:`demar.train.train` runs inside one MLflow run of the
experiment ``demar-<preset>`` (params = the resolved configs, flattened; tags for
the git commit, dirty tree, DVC stage, row and seed; system metrics).

Inputs: ``data/latents`` and, for the sample grids, ``models/tokenizer.pt``
(optional). Outputs: ``models/<row>/`` (``model.pt``, ``checkpoints/last.pt``,
``metrics.jsonl``) and ``metrics/train/<row>.json``. A killed run resumes from its
last checkpoint when started again (declare ``models/<row>`` ``persist: true``).

Single process: ``python -m pipelines.train --row demar``. Several processes or
nodes: ``torchrun --nproc_per_node 8 -m pipelines.train --row demar`` (see
:mod:`demar.distributed`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from demar.config import ConfigError, load_yaml, validate
from demar.io import write_json
from demar.params import Params
from demar.tracking import check_tracking, stage_run
from demar.train import RowConfig, row_model_config, row_train_config, train



def resolve(params: dict[str, Any], row_name: str, source: str) -> dict[str, Any]:
    """Validate everything the stage reads; errors name the key at fault.

    Returns:
        ``{"preset", "row", "model", "train", "tracking"}`` as config objects.
    """
    whole = validate(Params, params, source=source)  # the whole file: unknown keys anywhere are errors
    preset = whole.preset
    rows = params.get("rows") or {}
    if row_name not in rows:
        known = ", ".join(map(str, rows)) or "none"
        raise ConfigError(f"invalid configuration in {source}:\n  rows.{row_name}: unknown row (known: {known})")
    row = validate(RowConfig, rows[row_name], source=source, prefix=f"rows.{row_name}")
    train_cfg = row_train_config(row, params.get("train"), source=source)
    model_cfg = row_model_config(row, params.get("model"), source=source)
    tracking = whole.tracking
    return {"preset": preset, "row": row, "model": model_cfg, "train": train_cfg, "tracking": tracking}


def tokenizer_decoder(path: Path, model_cfg: Any, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokens [B, N, d] -> images [B, 3, H, W]`` through the tokenizer at ``path``."""
    from demar.model import unpatchify
    from demar.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(path, map_location=device)

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        latents = unpatchify(tokens.float(), model_cfg.patch_size, model_cfg.latent_channels)  # [B, C, h, w]
        return tokenizer.decode(latents)  # [B, 3, H, W]

    return decode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", required=True, help="the row of params.yaml (rows.<row>)")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--latents", default="data/latents", help="latent cache (default: %(default)s)")
    p.add_argument("--tokenizer", default="models/tokenizer.pt", help="for sample grids (default: %(default)s)")
    p.add_argument("--models", default="models", help="writes <models>/<row>/ (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/train", help="writes <metrics>/<row>.json (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    cfg = resolve(load_yaml(args.params), args.row, args.params)
    row, model_cfg, train_cfg, tracking = cfg["row"], cfg["model"], cfg["train"], cfg["tracking"]
    is_main = int(os.environ.get("RANK", "0")) == 0
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
    sys.exit(main())
