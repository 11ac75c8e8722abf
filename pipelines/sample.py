"""DVC stage ``sample@<row>``: draw the row's evaluation images with its EMA weights.

Reads ``params.yaml`` (``sample:``, ``rows.<row>``, ``preset``; the settings come from
:meth:`demar.params.Params.sample_config`), loads
``models/<row>/model.pt`` (EMA weights when ``sample.use_ema``) and
``models/tokenizer.pt``, and writes ``samples/<row>/``: the images, ``manifest.json``,
``grid.png`` and ``timing.json`` (see :mod:`demar.generate`). A killed run resumes
where it stopped when started again (declare the folder ``persist: true``).

A text-conditioned row draws image ``i`` from the caption of reference image ``i``
(``data/captions/reference``, written by ``encode_captions``); the manifest records
each image's caption and the class its caption names.

With ``--untrained`` it draws ``sample.untrained_num_images`` images, with the same
settings, from a freshly initialised model of the same config (seeded as training
seeds its initial weights) into ``samples/<row>_untrained/``: evaluation reports
FID and class accuracy of that model beside the trained one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from demar.captions import Prompts
from demar.config import ConfigError
from demar.distributed import resolve_device
from demar.generate import GenerateResult, generate
from demar.io import UnreadableFileError, UnsafeFileError, read_json
from demar.model import DeMAR, ModelConfig, ModelMismatchError, load_model
from demar.rng import derive_seed
from demar.tokenizer import Tokenizer
from demar.tracking import RunLogger, stage_run
from demar.params import Params
from pipelines import load_stage_params, run_stage


def arg_parser(description: str) -> argparse.ArgumentParser:
    """Arguments shared by the ``sample`` and ``time_fid`` stages."""
    p = argparse.ArgumentParser(description=description.splitlines()[0])
    p.add_argument("--row", required=True, help="the row of params.yaml (rows.<row>)")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument(
        "--models", default="models", help="folder of <row>/model.pt and tokenizer.pt (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p


class ModelFileError(ConfigError):
    """The row's model file is missing, unreadable, or holds a model of another config; the message names the file."""


def load_row_model(path: Path, expected: ModelConfig, row: str, *, use_ema: bool, device: torch.device) -> DeMAR:
    """The model of ``path``, refused unless it is a readable checkpoint built with ``rows.<row>``'s config.

    A missing file, one that is not a torch checkpoint, a truncated one, or one of another
    architecture (size, head switches, token shape; the differences listed) is a
    :class:`ModelFileError`, which the stage prints as one line.
    """
    try:
        return load_model(path, use_ema=use_ema, map_location=device, expected=expected)
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path} (the train stage of row {row!r} writes it)") from None
    except ModelMismatchError as err:
        raise ModelFileError(f"{err} (rows.{row} in params)") from None
    except (UnreadableFileError, UnsafeFileError) as err:
        raise ModelFileError(str(err)) from None


def untrained_like(model: DeMAR, seed: int) -> DeMAR:
    """A freshly initialised model of ``model``'s config, seeded as :mod:`demar.train` seeds its
    initial weights (``derive_seed(seed, "init")``): a training run with this seed starts from it.

    Args:
        model: the trained model (its config and device are used).
        seed: the row's seed.
    """
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as it was
        torch.manual_seed(derive_seed(seed, "init"))
        fresh = DeMAR(model.cfg)
    return fresh.to(device).eval()


def reference_prompts(params: Params, captions_dir: Path, data_dir: Path, count: int, seed: int) -> Prompts:
    """One caption of each of the first ``count`` reference images, each naming its image's class.

    An image with several captions (MS-COCO) gets one drawn uniformly by a generator
    seeded from ``seed``; the draw is part of the prompts' identity.

    Raises:
        ConfigError: the caption cache is missing (the ``encode_captions`` stage writes it), or it
            has fewer images than ``count``.
    """
    from demar.captions import CaptionCache
    from demar.data import open_split

    if not (captions_dir / "manifest.json").is_file():
        raise ConfigError(f"caption cache not found: {captions_dir} (the encode_captions stage writes it)")
    groups = read_json(captions_dir / "images.json")[:count]  # each image's caption indices
    if len(groups) < count:
        raise ConfigError(f"{count} images asked for but {captions_dir} holds the captions of {len(groups)} images")
    g = torch.Generator().manual_seed(derive_seed(seed, "prompts"))
    picks = torch.randint(0, 2**31, (count,), generator=g).tolist()
    indices = [group[p % len(group)] for group, p in zip(groups, picks, strict=True)]
    labels = open_split(params.data, data_dir, "reference").labels
    draw = f"|seed={seed}" if any(len(group) > 1 for group in groups) else ""
    return CaptionCache(captions_dir).prompts(indices, [int(x) for x in labels[:count]], draw=draw)


def log_result(run: RunLogger, result: GenerateResult) -> None:
    """Log a :func:`demar.generate.generate` result: the grid as an image, timing as metrics."""
    with Image.open(result.grid) as grid:
        run.log_image(grid.copy(), "grid")
    numeric = {k: v for k, v in result.timing.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.log_metrics({f"timing/{k}": v for k, v in numeric.items()})
    run.log_dict(result.timing, "timing.json")
    run.set_tags({"demar.device": result.timing.get("device", "")})


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--out", default="samples", help="samples folder (default: %(default)s)")
    p.add_argument("--untrained", action="store_true", help="sample a freshly initialised model instead")
    p.add_argument("--captions", default="data/captions/reference", help="text rows: the prompts' caption cache "
                   "(default: %(default)s)")
    p.add_argument("--data", default=None, help="text rows: the prepared data, for the classes the prompts name "
                   "(default: data/<data.kind>)")
    args = p.parse_args(argv)

    params = load_stage_params(args.params)
    section, row, preset, tracking = params.sample, params.row(args.row), params.preset, params.tracking
    device = resolve_device(args.device)

    model_file = Path(args.models) / args.row / "model.pt"
    tokenizer_file = Path(args.models) / "tokenizer.pt"
    expected = params.row_model(args.row)
    model = load_row_model(model_file, expected, args.row, use_ema=section.use_ema, device=device)
    tokenizer = Tokenizer.load(tokenizer_file, map_location=device)
    if args.untrained:
        model = untrained_like(model, row.seed)
        cfg = params.sample_config(args.row, section.untrained_num_images)
        out_dir, stage, source = Path(args.out) / f"{args.row}_untrained", "sample_untrained", None
    else:
        cfg = params.sample_config(args.row)
        out_dir, stage, source = Path(args.out) / args.row, "sample", model_file

    prompts = None
    if model.cfg.context == "text":  # image i from the caption of reference image i
        prompts = reference_prompts(params, Path(args.captions), Path(args.data or f"data/{params.data.kind}"),
                                    cfg.num_images, cfg.seed)  # fmt: skip
    with stage_run(
        stage, preset=preset, row=args.row, seed=row.seed, params={"sample": cfg.model_dump(mode="json")},
        enabled=tracking.enabled and not args.no_mlflow, system_metrics=tracking.system_metrics,
    ) as run:  # fmt: skip
        result = generate(
            model, tokenizer, cfg, out_dir, num_classes=model.cfg.num_classes, progress=not args.no_progress,
            run=run, model_file=source, tokenizer_file=tokenizer_file, on_mismatch="restart", prompts=prompts,
        )  # fmt: skip
        log_result(run, result)
    spi = result.sec_per_image
    print(f"wrote {cfg.num_images} images to {out_dir} ({spi:.4g} s/image on {result.timing['device']})")
    return 0


if __name__ == "__main__":
    run_stage(main, "sample")
