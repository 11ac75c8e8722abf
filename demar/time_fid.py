"""Figure 4a: seconds per image against FID over a grid of autoregressive and diffusion step counts.

Each point is a :func:`demar.generate.generate` run with the step counts swapped in,
timed by ``timing.json`` and scored by a caller-given function. A finished point is
stored as a small record beside its (deleted) images and reused only when its identity
matches: the config, the weights, the scorer's key and the code
(:func:`demar.identity.code_digest` of this module and :data:`demar.generate.IMAGE_CODE`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from demar.captions import Prompts
from demar.config import StrictConfig
from demar.generate import IMAGE_CODE, GenerateConfig, generate, weights_sha256
from demar.identity import code_digest
from demar.images import GeneratedImages
from demar.io import read_json, write_json

if TYPE_CHECKING:
    from demar.model import DeMAR
    from demar.tokenizer import Tokenizer
    from demar.tracking import RunLogger

__all__ = ["TimeFidConfig", "sweep_steps"]


class TimeFidConfig(StrictConfig):
    """The ``time_fid:`` section: the sampling settings of Figure 4a's time-vs-FID curves.

    Every pair of ``ar_steps`` x ``diffusion_steps`` is one point; the other sampler
    knobs (guidance, temperature, ...) are those of ``sample.sampler``.

    Attributes:
        ar_steps: autoregressive step counts K.
        diffusion_steps: respaced diffusion step counts (MAR's 100 by default).
        num_images: images per point, a multiple of the number of classes.
        batch_size: images per batch; None takes ``sample.batch_size``.
        families_only: only rows of a Figure 4 family (ablations ``mar`` and ``demar``)
            are swept; the others get an empty list of points.
        keep_images: keep each point's images instead of deleting them once scored.
    """

    ar_steps: tuple[int, ...] = Field((16, 32, 64, 128, 256), min_length=1)
    diffusion_steps: tuple[int, ...] = Field((100,), min_length=1)
    num_images: int = Field(50_000, ge=1)
    batch_size: int | None = Field(None, ge=1)
    families_only: bool = True
    keep_images: bool = False


def sweep_steps(
    model: DeMAR,
    tokenizer: Tokenizer,
    base: GenerateConfig,
    sweep: TimeFidConfig,
    scratch: str | os.PathLike[str],
    *,
    num_classes: int,
    score: Callable[[GeneratedImages], float],
    score_key: str = "",
    progress: bool = True,
    run: RunLogger | None = None,
    prompts: Prompts | None = None,
) -> list[dict[str, Any]]:
    """Time and score the model at every ``(ar_steps, diffusion_steps)`` pair.

    Each point is a :func:`demar.generate.generate` run into ``scratch/ar<K>_diff<T>/`` with
    ``base``'s settings but ``num_iter = K``, ``diffusion_steps = T`` and ``sweep``'s image
    count; ``score`` gives its FID, ``timing.json`` its seconds per image. A finished point
    is stored as ``scratch/ar<K>_diff<T>.json`` and its images are deleted (unless
    ``sweep.keep_images``); a later call with the same identity reuses it, and an
    unfinished point resumes.

    Args:
        model: the model (EMA weights loaded by the caller).
        tokenizer: the tokenizer bundle.
        base: seed, batch size, format and the sampler knobs not swept.
        sweep: the step counts, image count and batch size of the sweep.
        scratch: folder for the points' images and records (created).
        num_classes: the number of classes C.
        score: maps a point's images to its FID, e.g. :func:`demar.metrics.compute_metrics`'s ``fid``.
        score_key: identity of ``score`` (its code, extractor weights, reference), stored
            with each point so that a changed scorer recomputes it.
        progress: show tqdm bars.
        run: an MLflow run; each point is logged at ``step = K``.
        prompts: a text-conditioned model's prompts (image ``i`` from prompt ``i``; default None).

    Returns:
        One ``{"ar_steps", "diffusion_steps", "sec_per_image", "fid"}`` per point, in
        order of ``diffusion_steps`` then ``ar_steps``.
    """
    scratch = Path(scratch)
    identity = {
        "model_weights_sha256": weights_sha256(model),
        "tokenizer_weights_sha256": weights_sha256(tokenizer),
        "num_classes": num_classes,
        "score_key": score_key,
        "code": code_digest(__name__, *IMAGE_CODE),
        **({"prompts": prompts.source} if prompts is not None else {}),
    }
    points = []
    for t in sweep.diffusion_steps:
        for k in sweep.ar_steps:
            name = f"ar{k:04d}_diff{t:04d}"
            data = base.model_dump()
            data.update(
                num_images=sweep.num_images,
                batch_size=sweep.batch_size or base.batch_size,
                sampler={**data["sampler"], "num_iter": k, "diffusion_steps": t},
            )
            cfg = GenerateConfig.model_validate(data)
            key = {"config": cfg.model_dump(mode="json"), **identity}
            record_path = scratch / f"{name}.json"
            if record_path.is_file():
                record = read_json(record_path)
                old = record.get("key") or {}
                if old == key:
                    points.append(record["point"])
                    continue
                diff = ", ".join(sorted(n for n in set(key) | set(old) if key.get(n) != old.get(n)))
                print(f"{record_path}: recorded with other {diff}; computing the point afresh", file=sys.stderr)
            folder = scratch / name
            result = generate(
                model, tokenizer, cfg, folder, num_classes=num_classes, progress=progress, on_mismatch="restart",
                prompts=prompts,
            )
            point = {
                "ar_steps": k,
                "diffusion_steps": t,
                "sec_per_image": result.sec_per_image,
                "fid": float(score(GeneratedImages(folder))),
            }
            write_json(record_path, {"key": key, "point": point, "timing": result.timing})
            if not sweep.keep_images:
                shutil.rmtree(folder)
            if run is not None:
                run.log_metrics(
                    {f"time_fid/diff{t}/fid": point["fid"], f"time_fid/diff{t}/sec_per_image": point["sec_per_image"]},
                    step=k,
                )
            points.append(point)
    return points
