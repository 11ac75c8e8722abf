"""The named objectives a study can optimise: train-and-score and sample-and-score.

Both call the functions the DVC stages call: :func:`demar.train.train`,
:func:`demar.generate.generate` and :func:`demar.metrics.compute_metrics`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from demar.config import StrictConfig, validate
from demar.studies.base import StudyBase
from demar.studies.config import METRIC_GROUPS, StudyConfig
from demar.tracking import RunLogger

__all__ = [
    "OBJECTIVES",
    "TrialContext",
    "TrialOutcome",
    "budgeted_train_config",
    "sampling_objective",
    "training_objective",
]

@dataclass
class TrialContext:
    """What an objective gets for one trial.

    Attributes:
        trial: the Optuna trial (for intermediate reports and pruning).
        study: the study's config.
        base: the resolved base.
        configs: the base configs with the fixed and the trial's values set.
        work_dir: an empty folder for the trial's files (removed after the trial).
        run: the trial's MLflow run.
        progress: show progress bars.
    """

    trial: optuna.Trial
    study: StudyConfig
    base: StudyBase
    configs: dict[str, StrictConfig]
    work_dir: Path
    run: RunLogger
    progress: bool = False


@dataclass
class TrialOutcome:
    """What an objective returns.

    Attributes:
        values: every value measured (the study's objectives and any extra ones).
        grid: a sample grid image of the trial, or None.
    """

    values: dict[str, float]
    grid: Path | None = None


def _score(ctx: TrialContext, model: Any, tokenizer: Any, num_images: int, out_dir: Path,
           names: Sequence[str]) -> tuple[dict[str, float], Any]:  # fmt: skip
    """Sample ``num_images`` images as the ``sample`` stage does and score them as ``evaluate`` does.

    Returns ``(values, GenerateResult)``; values hold the requested metrics and ``sec_per_image``.
    """
    from demar.generate import generate
    from demar.images import GeneratedImages
    from demar.metrics import compute_metrics

    gen_cfg = ctx.configs["sample"].for_run(ctx.base.seed, num_images)
    result = generate(
        model, tokenizer, gen_cfg, out_dir, num_classes=model.cfg.num_classes, progress=ctx.progress,
        on_mismatch="restart",
    )  # fmt: skip
    values: dict[str, float] = {}
    groups = sorted({METRIC_GROUPS[n] for n in names if n in METRIC_GROUPS})
    if groups:
        kwargs = {**ctx.base.evaluate.metric_kwargs(), "metrics": tuple(groups)}
        values.update(compute_metrics(GeneratedImages(out_dir), ctx.base.evaluate.reference, **kwargs, progress=False))
    if result.sec_per_image is not None:
        values["sec_per_image"] = float(result.sec_per_image)
    return values, result


def budgeted_train_config(cfg: Any, steps: int, num_images: int) -> Any:
    """``cfg`` shortened to ``steps`` optimizer steps over ``num_images`` images.

    The length becomes ``epochs = steps * batch_size / num_images`` and the warm-up
    keeps its share of the run (``warmup_epochs`` scaled by the same factor).

    Args:
        cfg: the row's :class:`demar.train_config.TrainConfig`.
        steps: the trial's steps.
        num_images: images in the latent set.
    """
    epochs = steps * cfg.batch_size / num_images
    data = {**cfg.model_dump(), "epochs": epochs, "warmup_epochs": cfg.warmup_epochs * epochs / cfg.epochs}
    return validate(type(cfg), data, source="study budget", prefix="train")


def training_objective(ctx: TrialContext) -> TrialOutcome:
    """Train the row with the trial's values for ``budget.train_steps`` steps and score it.

    Every ``budget.eval_every`` steps (before the last) the EMA model is scored on
    ``budget.eval_images`` images; the first objective's value is reported to the
    trial, logged as ``intermediate/<name>`` and the run stops if the pruner says so
    (:class:`optuna.TrialPruned`). At the end the EMA weights of ``model.pt`` are
    scored on ``budget.images`` images.

    Args:
        ctx: the trial's context (configs ``model``, ``train``, ``sample``).
    """
    from demar.distributed import resolve_device
    from demar.latents import LatentDataset
    from demar.model import load_model
    from demar.tokenizer import Tokenizer
    from demar.train import train

    budget, names = ctx.study.budget, list(ctx.study.objectives)
    steps = int(budget.train_steps or 0)
    train_cfg = budgeted_train_config(ctx.configs["train"], steps, len(LatentDataset(ctx.base.latents)))
    device = resolve_device(train_cfg.device)
    tokenizer = Tokenizer.load(ctx.base.tokenizer, map_location=device)

    def evaluate_during_training(step: int, model: Any, ema_model: Any) -> None:
        if budget.eval_every is None or step % budget.eval_every or step >= steps:
            return
        out = ctx.work_dir / f"eval-{step:07d}"
        values, _ = _score(ctx, ema_model, tokenizer, budget.eval_images or budget.images, out, names[:1])
        shutil.rmtree(out, ignore_errors=True)
        value = values[names[0]]
        ctx.run.log_metrics({f"intermediate/{names[0]}": value}, step=step)
        ctx.trial.report(value, step)
        if ctx.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with {names[0]} = {value:.4g}")

    result = train(
        ctx.configs["model"], train_cfg, latents_dir=ctx.base.latents, out_dir=ctx.work_dir / "train",
        run=ctx.run, callback=evaluate_during_training, progress=ctx.progress,
    )  # fmt: skip
    model = load_model(result.model_path, use_ema=ctx.configs["sample"].use_ema, map_location=device)
    values, gen = _score(ctx, model, tokenizer, budget.images, ctx.work_dir / "samples", names)
    if len(names) == 1:
        ctx.trial.report(values[names[0]], steps)
    values["train_loss"] = float(result.metrics["loss"])
    return TrialOutcome(values, gen.grid)


def sampling_objective(ctx: TrialContext) -> TrialOutcome:
    """Sample ``base.checkpoint`` with the trial's ``sample.*`` values and score ``budget.images`` images.

    Args:
        ctx: the trial's context (config ``sample``).
    """
    from demar.distributed import resolve_device
    from demar.model import load_model
    from demar.tokenizer import Tokenizer

    device = resolve_device("auto")
    model = load_model(ctx.base.checkpoint, use_ema=ctx.configs["sample"].use_ema, map_location=device)
    tokenizer = Tokenizer.load(ctx.base.tokenizer, map_location=device)
    values, gen = _score(ctx, model, tokenizer, ctx.study.budget.images, ctx.work_dir / "samples",
                         list(ctx.study.objectives))  # fmt: skip
    return TrialOutcome(values, gen.grid)


OBJECTIVES: dict[str, Callable[[TrialContext], TrialOutcome]] = {
    "training": training_objective,
    "sampling": sampling_objective,
}
"""The named objectives a study file can choose (``objective:``)."""


