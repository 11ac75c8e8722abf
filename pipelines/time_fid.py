"""DVC stage ``time_fid@<row>``: the row's points of Figure 4a (seconds per image vs FID).

For every pair of ``time_fid.ar_steps`` x ``time_fid.diffusion_steps`` it samples
``time_fid.num_images`` images with :func:`demar.time_fid.sweep_steps` (the other
sampler knobs from ``sample.sampler``, the seed from ``rows.<row>.seed``) and
scores them with :func:`demar.metrics.compute_metrics` under the ``evaluate:``
settings, as the ``evaluate`` stage does. It writes ``metrics/time_fid/<row>.json``:
``{"row", "family", "ablation", "size", "seed", "points": [{"ar_steps",
"diffusion_steps", "sec_per_image", "fid"}]}``.

The points' images live in ``samples/time_fid/<row>/`` while they are scored and are
then deleted; each finished point leaves a record there, so a killed run resumes
(declare the folder ``persist: true``). Rows outside a Figure 4 family (ablations
other than ``mar`` and ``demar``) get no points when ``time_fid.families_only``.

Run as a module from the repository root: ``python -m pipelines.time_fid --row <row>``.
"""

from __future__ import annotations

from pathlib import Path

from demar.distributed import resolve_device
from demar.identity import code_digest
from demar.image_sets import reference_identity
from demar.images import GeneratedImages
from demar.io import write_json
from demar.metrics import compute_metrics
from demar.time_fid import sweep_steps
from demar.tokenizer import Tokenizer
from demar.tracking import stage_run
from pipelines import load_stage_params, run_stage
from pipelines.sample import arg_parser, load_row_model
from reports.data import family_of


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--scratch", default="samples/time_fid", help="folder of the points' images (default: %(default)s)")
    p.add_argument("--out", default="metrics/time_fid", help="metrics folder (default: %(default)s)")
    p.add_argument("--captions", default="data/captions/reference", help="text rows: the prompts' caption cache "
                   "(default: %(default)s)")
    p.add_argument("--data", default=None, help="text rows: the prepared data (default: data/<data.kind>)")
    args = p.parse_args(argv)

    params = load_stage_params(args.params)
    section, sweep, evaluate, row = params.sample, params.time_fid, params.evaluate, params.row(args.row)
    preset, tracking = params.preset, params.tracking
    family = family_of(row.ablation)
    out_file = Path(args.out) / f"{args.row}.json"
    record = {"row": args.row, "family": family, "ablation": row.ablation, "size": row.size, "seed": row.seed}

    (Path(args.scratch) / args.row).mkdir(parents=True, exist_ok=True)  # the stage's declared output
    if family is None and sweep.families_only:
        write_json(out_file, {**record, "points": []})
        print(f"row {args.row} (ablation {row.ablation!r}) is in no Figure 4 family: no points, wrote {out_file}")
        return 0

    device = resolve_device(args.device)
    model_file = Path(args.models) / args.row / "model.pt"
    expected = params.row_model(args.row)
    model = load_row_model(model_file, expected, args.row, use_ema=section.use_ema, device=device)
    tokenizer = Tokenizer.load(Path(args.models) / "tokenizer.pt", map_location=device)
    metric_kwargs = {**evaluate.metric_kwargs(), "metrics": ("fid",)}

    def score(images: GeneratedImages) -> float:
        return compute_metrics(images, evaluate.reference, **metric_kwargs, progress=not args.no_progress)["fid"]

    score_key = (
        f"{evaluate.model_dump_json()}|{evaluate.extractor_spec().digest()}|{reference_identity(evaluate.reference)}"
        f"|{code_digest('demar.metrics')}"
    )
    base = params.sample_config(args.row)
    prompts = None
    if model.cfg.context == "text":  # as the sample stage: image i from the caption of reference image i
        from pipelines.sample import reference_prompts

        data_dir = Path(args.data or f"data/{params.data.kind}")
        prompts = reference_prompts(params, Path(args.captions), data_dir, params.time_fid.num_images, base.seed)
    with stage_run(
        "time_fid", preset=preset, row=args.row, seed=row.seed,
        params={"time_fid": sweep.model_dump(mode="json"), "sample": base.model_dump(mode="json")},
        enabled=tracking.enabled and not args.no_mlflow, system_metrics=tracking.system_metrics,
    ) as run:  # fmt: skip
        points = sweep_steps(
            model, tokenizer, base, sweep, Path(args.scratch) / args.row, num_classes=model.cfg.num_classes,
            score=score, score_key=score_key, progress=not args.no_progress, run=run, prompts=prompts,
        )  # fmt: skip
        write_json(out_file, {**record, "points": points})
        run.log_dict({**record, "points": points}, "time_fid.json")
    for pt in points:
        k, t, sec, fid = pt["ar_steps"], pt["diffusion_steps"], pt["sec_per_image"], pt["fid"]
        print(f"K={k:4d} T={t:4d}: {sec:.4g} s/image, FID {fid:.3f}")
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    run_stage(main, "time_fid")
