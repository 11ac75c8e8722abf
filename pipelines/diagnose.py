"""DVC stage ``diagnose@<row>``: what the denoising head does, measured on held-out tokens.

Reads ``params.yaml`` (``diagnostics``, ``rows.<row>``, ``sample``, ``evaluate``, ``data``,
``preset``, ``tracking``), loads ``models/<row>/model.pt`` (the weights the sample stage
uses) and ``models/tokenizer.pt``, and encodes the first ``diagnostics.num_images``
images of the reference split (held out from training) into tokens. For every row it
measures the backbone's masked-token diffusion loss with ground-truth, noisy and
own-sample visible tokens; for the De. Head rows also the errors of x~, y and the fused
token by injection level, the calibration of the assessment scores, and FID and class
accuracy of samples drawn with refinement off (``samples/<row>_norefine/``; for the other
rows the folder holds only ``unused.json``), to set beside the evaluate stage's numbers
with refinement on (see :mod:`demar.diagnostics`).

A text row is measured with the captions of the same reference images as its
context (``data/captions/reference``), and samples with refinement off from them.

Writes ``metrics/diagnostics/<row>.json`` and logs it to an MLflow run.

``python -m pipelines.diagnose --row demar``
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from demar.data import open_split
from demar.diagnostics import assessment_calibration, denoising_by_level, held_out_tokens, masked_loss_by_visible
from demar.distributed import resolve_device
from demar.io import write_json
from demar.tokenizer import Tokenizer
from demar.tracking import stage_run
from pipelines import load_stage_params, run_stage
from pipelines.sample import arg_parser, load_row_model, reference_prompts


def refine_off_scores(params: Any, row: str, model: Any, tokenizer: Tokenizer, out_dir: Path, device: torch.device,
                      progress: bool, prompts: Any = None) -> dict[str, Any]:  # fmt: skip
    """FID and class accuracy of ``diagnostics.refine_off_images`` samples drawn with ``refine: false``."""
    from demar.generate import generate
    from demar.metrics import compute_metrics
    from pipelines.evaluate import sample_class_accuracy

    cfg = params.sample_config(row, params.diagnostics.refine_off_images)
    cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"refine": False})})
    generate(model, tokenizer, cfg, out_dir, num_classes=model.cfg.num_classes, progress=progress,
             on_mismatch="restart", prompts=prompts)  # fmt: skip
    evaluate = params.evaluate
    kwargs = {**evaluate.metric_kwargs(), "metrics": ("fid",), "cuda": device.type == "cuda", "progress": progress}
    from demar.image_sets import open_images

    fid = compute_metrics(open_images(out_dir), evaluate.reference, **kwargs)["fid"]
    return {"num_images": cfg.num_images, "fid": fid,
            "class_accuracy": sample_class_accuracy(evaluate, out_dir, str(device))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--data", default=None, help="prepared data (default: data/<data.kind>)")
    p.add_argument("--samples", default="samples", help="folder of <row>_norefine/ (default: %(default)s)")
    p.add_argument("--out", default=None, help="metrics file (default: metrics/diagnostics/<row>.json)")
    p.add_argument("--captions", default="data/captions/reference", help="text rows: the reference captions' cache "
                   "(default: %(default)s)")
    args = p.parse_args(argv)

    params = load_stage_params(args.params)
    cfg, row = params.diagnostics, params.row(args.row)
    expected = params.row_model(args.row)
    device = resolve_device(args.device)
    model = load_row_model(Path(args.models) / args.row / "model.pt", expected, args.row,
                           use_ema=params.sample.use_ema, device=device)  # fmt: skip
    tokenizer = Tokenizer.load(Path(args.models) / "tokenizer.pt", map_location=device)
    out_file = Path(args.out or f"metrics/diagnostics/{args.row}.json")
    data_dir = Path(args.data or f"data/{params.data.kind}")
    norefine = Path(args.samples) / f"{args.row}_norefine"

    with stage_run(
        "diagnose", preset=params.preset, row=args.row, seed=row.seed,
        params={"diagnostics": cfg.model_dump(mode="json")},
        enabled=params.tracking.enabled and not args.no_mlflow, system_metrics=params.tracking.system_metrics,
    ) as run:  # fmt: skip
        start = time.perf_counter()
        images = open_split(params.data, data_dir, "reference")
        tokens, labels = held_out_tokens(tokenizer, images, cfg.num_images, expected.patch_size,
                                         batch_size=cfg.batch_size)  # fmt: skip
        tokens, context = tokens.to(device), labels.to(device)
        prompts = None
        if expected.context == "text":  # the captions of the same reference images
            count = max(len(tokens), cfg.refine_off_images)
            prompts = reference_prompts(params, Path(args.captions), data_dir, count, row.seed)
            context = prompts.states[: len(tokens)].to(device, torch.float32)  # [B, L, C]
        record: dict[str, Any] = {
            "row": args.row,
            "ablation": row.ablation,
            "size": row.size,
            "seed": row.seed,
            "num_tokens_images": len(tokens),
            "masked_loss": masked_loss_by_visible(
                model, tokens, context, mask_ratio=cfg.mask_ratio, diffusion_steps=cfg.diffusion_steps, seed=cfg.seed
            ),
            "levels": None,
            "calibration": None,
            "refine_off": None,
        }
        if model.denoising_head is not None:
            g = lambda: torch.Generator(device=device).manual_seed(cfg.seed)  # noqa: E731 - the same masks and noise
            levels = denoising_by_level(model, tokens, context, cfg.levels, mask_ratio=cfg.mask_ratio, generator=g())
            record["levels"] = [lv.as_dict() for lv in levels]
            record["calibration"] = assessment_calibration(model, tokens, context, cfg.levels,
                                                           mask_ratio=cfg.mask_ratio, bins=cfg.bins, generator=g())  # fmt: skip
            if cfg.refine_off_images:
                record["refine_off"] = refine_off_scores(params, args.row, model, tokenizer, norefine, device,
                                                         not args.no_progress, prompts)  # fmt: skip
        if record["refine_off"] is None:  # MAR rows sample the same either way: the folder says so
            write_json(norefine / "unused.json", {"reason": "refinement off is not drawn for this row"})
        wall_s = time.perf_counter() - start
        write_json(out_file, record)
        flat = {f"diagnostics/masked_loss_{k}": v for k, v in record["masked_loss"].items()}
        if record["calibration"] is not None:
            flat["diagnostics/calibration_pearson"] = record["calibration"]["pearson"]
        if record["refine_off"] is not None:
            flat["diagnostics/refine_off_fid"] = record["refine_off"]["fid"]
        run.log_metrics({**flat, "diagnostics/wall_s": wall_s})
        run.log_dict(record, "diagnostics.json")
    print(f"{args.row}: masked-token loss {record['masked_loss']} ({wall_s:.1f} s); wrote {out_file}")
    return 0


if __name__ == "__main__":
    run_stage(main, "diagnose")
