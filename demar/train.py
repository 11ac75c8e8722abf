"""The training engine: every ablation row trained the MAR way.

One function, :func:`train`, serves the DVC stage (``pipelines/train.py``), the
Optuna studies and the tests. The recipe is MAR's (``mar-reference.md``,
"Training recipe"):

- AdamW, betas (0.9, 0.95), ``lr = base_lr * global_batch / 256``;
- weight decay on matrices only: none on biases, on 1-D parameters (norms,
  embeddings' vectors) or on any diffusion head parameter (MAR's ``diffloss``);
- linear warm-up from 0, then constant (MAR) or half-cosine down to ``min_lr``;
- gradient-norm clipping, an EMA of the weights updated every step from the
  initial weights, bf16 autocast on GPUs only (fp16 gives NaNs with MAR).

One step (the numbered comments of ``_Trainer.train_step``):

1. The global batch of ``batch_size`` images is split into ``micro_batches``
   slices (default: one per process, as MAR's one batch per GPU). A process
   handles ``micro_batches / world_size`` of them, one forward
   and backward each, accumulating gradients; DDP averages over processes.
2. For each slice: draw latents from the cached posterior moments
   (:func:`demar.latents.draw_latents`), patchify, forward, backward.
3. Average the loss components over processes; stop on a non-finite value.
4. Clip the gradient norm, AdamW step, learning-rate step, EMA update.

Exact resume and world-size independence. Every random draw of a step is a
function of ``(seed, step, slice)`` alone: the data order (a fresh permutation
per epoch, seeded by ``(seed, epoch)``, read as one endless stream of
``batch_size`` positions a step), the generator of ``draw_latents``, the
generator of the model's masking and noise, and the global RNG behind dropout
(re-seeded before each slice). A resumed run therefore replays the same draws as
an uninterrupted one (bitwise-identical weights on the CPU), and a run on ``W``
processes makes the same draws as a run on one process with the same
explicit ``micro_batches``; only the order of floating-point sums in the gradient
all-reduce can differ. A slice is what MAR calls one GPU's batch: the masking
ratio is drawn once per slice.

Outputs in ``out_dir`` (rank 0 writes, others only compute):

- ``metrics.jsonl``: one JSON record per logged step (loss components, lr,
  gradient norm, tokens/s, steps/s), whatever happens to MLflow; written just
  before each checkpoint, so it always holds every step the checkpoint covers;
- ``checkpoints/last.pt``: model, EMA, optimizer, scheduler, step, RNG states
  (tensors), the data-order state and the run identity (below), tensors and plain
  values only, written atomically every ``checkpoint_every`` steps and at the end;
- ``model.pt``: the final model with its EMA weights, config and run identity
  (:func:`demar.model.save_checkpoint`).

Run identity. A call resumes from ``last.pt`` only when it was written by the
same run: the same configs (keys of :data:`demar.train_config.OPERATIONAL_KEYS`
aside), device type, slicing, latent set and code (:func:`demar.identity.code_digest`
of :data:`CODE_MODULES`). Otherwise, or when the file is unreadable (set aside as
``last.pt.unreadable``), it says why in one line and starts fresh, removing the
earlier outputs. A finished run of the same identity computes and writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from demar import distributed as D
from demar.batching import StepBatchSampler
from demar.captions import CaptionCache
from demar.config import ConfigError
from demar.diffusion_head import DiffusionHead
from demar.ema import EMA
from demar.identity import code_digest
from demar.images import to_uint8
from demar.io import (
    UnreadableFileError,
    atomic_write_text,
    ensure_writable,
    read_json,
    remove_stale_temporaries,
    torch_load,
    torch_save,
)
from demar.latents import LatentDataset, draw_latents
from demar.model import DeMAR, ModelConfig, patchify, save_checkpoint
from demar.rng import derive_seed
from demar.text_latents import TextLatentDataset
from demar.train_config import OPERATIONAL_KEYS, TrainConfig, lr_at, steps_for

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "MODEL_NAME",
    "NonFiniteLossError",
    "TrainResult",
    "param_groups",
    "read_metrics",
    "train",
]

CHECKPOINT_NAME = "checkpoints/last.pt"
METRICS_NAME = "metrics.jsonl"
MODEL_NAME = "model.pt"

# The modules whose code determines a run's result: this engine and all it imports.
CODE_MODULES = ("demar.train",)


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) of a step is NaN or infinite.

    Attributes:
        step: the 0-based index of the failing step (the checkpoint on disk, if any, is older).
        components: the step's loss components averaged over processes.
    """

    def __init__(self, step: int, components: dict[str, float]) -> None:
        self.step = step
        self.components = dict(components)
        shown = ", ".join(f"{k}={v:.6g}" for k, v in components.items())
        super().__init__(
            f"non-finite loss at step {step} ({shown}); training stopped before the "
            "optimizer step, the last checkpoint on disk is untouched"
        )


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        metrics: final metrics (``steps``, ``loss`` and its components averaged over the
            last ``log_every`` steps, ``tokens_per_s``, ``steps_per_s``, ``wall_s``,
            parameter counts).
        model_path: the final model file (``out_dir/model.pt``).
        checkpoint_path: the last training checkpoint.
        metrics_path: the per-step metrics file (``out_dir/metrics.jsonl``).
        history: the logged records, oldest first.
        resumed_from: the step the run resumed from (0 for a fresh run).
    """

    metrics: dict[str, Any]
    model_path: Path
    checkpoint_path: Path
    metrics_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0


# ---------------------------------------------------------------------- pure helpers


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups with MAR's weight-decay rule.

    No decay on 1-D parameters, on biases and on every parameter of a
    :class:`~demar.diffusion_head.DiffusionHead` (MAR's ``add_weight_decay``:
    ``diffloss`` parameters are exempt); decay ``weight_decay`` on the rest.

    Args:
        model: the bare model.
        weight_decay: decay of the decayed group.
    """
    head_params = {id(p) for m in model.modules() if isinstance(m, DiffusionHead) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or id(p) in head_params:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (an empty list if there is none).

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))


def _config_record(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": model_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json")}


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ in ways that change what training computes."""
    diffs = []
    for section in ("model", "train"):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in OPERATIONAL_KEYS:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}")
    return diffs


def _identity_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run identity and the current one (empty: resume)."""
    if not isinstance(saved, dict):
        return ["the run identity (none recorded)"]
    diffs = _config_differences(saved.get("config") or {}, current["config"])
    saved_run = saved.get("run") or {}
    diffs += [f"{key} ({saved_run.get(key)} -> {v})" for key, v in current["run"].items() if saved_run.get(key) != v]
    if saved.get("latents") != current["latents"]:
        diffs.append("the latent set")
    if saved.get("code") != current["code"]:
        diffs.append(f"the code ({', '.join(CODE_MODULES)} and the modules it imports)")
    return diffs


def _say(message: str) -> None:
    """One line on stderr (outside the progress bar)."""
    print(message, file=sys.stderr, flush=True)


def _to_device(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def _item(x: Any) -> torch.Tensor:
    """A loss component as a detached float32 scalar (``None`` -> 0)."""
    if x is None:
        return torch.zeros(())
    return x.detach().float().reshape(())


# ---------------------------------------------------------------------- the engine


COMPONENTS = ("loss", "loss_diffusion", "loss_refinement", "loss_assessment")


class _Window:
    """Sums of the metrics of the steps since the last logged record."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys((*COMPONENTS, "grad_norm"), 0.0)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, components: list[float], grad_norm: float, tokens: int, seconds: float) -> None:
        for k, v in zip(COMPONENTS, components, strict=True):
            self.sums[k] += v
        self.sums["grad_norm"] += grad_norm
        self.steps, self.tokens, self.seconds = self.steps + 1, self.tokens + tokens, self.seconds + seconds

    def means(self) -> dict[str, float]:
        """Mean loss components and gradient norm; tokens/s and steps/s of the window."""
        return {
            **{k: v / self.steps for k, v in self.sums.items()},
            "tokens_per_s": self.tokens / self.seconds,
            "steps_per_s": self.steps / self.seconds,
        }


def _training_set(
    model_cfg: ModelConfig, cfg: TrainConfig, latents_dir: Path, captions_dir: Path | None
) -> LatentDataset | TextLatentDataset:
    """The latents, paired with caption states for a text-conditioned model."""
    latents = LatentDataset(latents_dir)
    if model_cfg.context != "text":
        return latents
    if captions_dir is None:
        raise ConfigError("model.context is 'text': training needs the caption cache (captions_dir)")
    captions = CaptionCache(captions_dir)
    length, width = captions.states_shape
    if width != model_cfg.text_dim:
        raise ConfigError(
            f"model.text_dim is {model_cfg.text_dim} but the caption cache {captions_dir} holds states of width {width}"
        )
    if length > model_cfg.buffer_size:
        raise ConfigError(
            f"model.buffer_size ({model_cfg.buffer_size}) is below the {length} caption tokens of {captions_dir}"
        )
    images = captions_dir / "images.json"  # per image, its captions (written by the encode_captions stage)
    return TextLatentDataset(latents, captions, cfg.seed, read_json(images) if images.is_file() else None)


class _Trainer:
    """State and loop of one :func:`train` call (a class only to keep ``train`` short)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        env: D.DistEnv,
        latents_dir: Path,
        captions_dir: Path | None,
        out_dir: Path,
        run: Any,
        callback: Callable[[int, nn.Module, nn.Module], None] | None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None,
        progress: bool,
        resume: bool,
    ) -> None:
        self.model_cfg, self.cfg, self.env = model_cfg, cfg, env
        self.out_dir = out_dir
        self.run = run if env.is_main else None
        self.callback, self.decode = callback, decode
        self.progress = progress and env.is_main
        self.device = env.device
        self.micro_batches = cfg.micro_batches or env.world_size
        if self.micro_batches % env.world_size or cfg.batch_size % self.micro_batches:
            raise ConfigError(
                f"train.micro_batches ({cfg.micro_batches}) must be a multiple of the number of processes "
                f"({env.world_size}) and divide train.batch_size ({cfg.batch_size})"
            )
        self.dataset = _training_set(model_cfg, cfg, latents_dir, captions_dir)
        self.num_images = len(self.dataset)
        self.total_steps, self.warmup_steps = steps_for(cfg, self.num_images)
        self.checkpoint_path = out_dir / CHECKPOINT_NAME
        self.metrics_path = out_dir / METRICS_NAME
        self.model_path = out_dir / MODEL_NAME
        manifest = json.dumps(self.dataset.manifest, sort_keys=True).encode()
        # What the result depends on: resumed only when all of it matches (operational keys aside).
        self.identity = {
            "config": _config_record(model_cfg, cfg),
            "run": {"device": self.device.type, "micro_batches": self.micro_batches},
            "latents": hashlib.sha256(manifest).hexdigest(),
            "code": code_digest(*CODE_MODULES),
        }

        self._build_model()
        self.history: list[dict[str, Any]] = []
        self.step = 0
        # Cumulative over resumptions: seconds in train steps, tokens, steps, wall seconds.
        self.timing: dict[str, float] = {"train_s": 0.0, "tokens": 0, "steps": 0, "wall_s": 0.0}
        self._wall_start: float | None = time.perf_counter()
        if not (resume and self._maybe_resume()):
            self._clear_outputs()
        self.resumed_from = self.step
        self.saved_timing = dict(self.timing)  # as of the last checkpoint
        self.ddp = D.wrap_ddp(self.model, env, find_unused_parameters=self._needs_find_unused())
        self.forward_model = torch.compile(self.ddp) if cfg.compile else self.ddp

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> None:
        cfg = self.cfg
        # Same initial weights on every process and every run of the same seed.
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = DeMAR(self.model_cfg)
        if cfg.grad_checkpointing:
            switched = 0
            for m in model.modules():
                if hasattr(m, "grad_checkpointing"):
                    m.grad_checkpointing = True
                    switched += 1
            if not switched:
                raise ConfigError("train.grad_checkpointing is on but the model has no checkpointed blocks")
        self.model = model.to(self.device)
        self.ema = EMA(self.model, cfg.ema_rate)
        # The fused kernel: one pass over all parameters instead of a loop of small ops per tensor.
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=True
        )
        total, warmup = self.total_steps, self.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, cfg, total, warmup) / cfg.lr
        )

    def _maybe_resume(self) -> bool:
        """Load ``last.pt`` when it was written by this run identity; return whether it was.

        A checkpoint of another identity (config, latent set or code) is not used;
        an unreadable one (truncated, not a torch file) is renamed ``last.pt.unreadable``
        and reported. Either way the run starts fresh, saying why in one line. A file
        holding pickled objects other than tensors is refused (:class:`demar.io.UnsafeFileError`).
        """
        path = self.checkpoint_path
        if not path.is_file():
            return False
        try:
            ckpt = torch_load(path)
            if not isinstance(ckpt, dict) or not {"model", "ema", "optimizer", "scheduler", "step", "rng"} <= set(ckpt):
                raise UnreadableFileError(path, "not a training checkpoint of this engine")
        except UnreadableFileError as err:
            D.barrier(self.env)  # every process has read the file before it moves
            if self.env.is_main:
                aside = path.with_name(path.name + ".unreadable")
                os.replace(path, aside)
                _say(f"{err}; set aside as {aside}, starting a fresh run")
            return False
        diffs = _identity_differences(ckpt.get("identity"), self.identity)
        if diffs:
            if self.env.is_main:
                _say(f"{path} was written with another {', '.join(diffs)}; starting a fresh run that replaces it")
            return False
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.timing = dict(ckpt["timing"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch_cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.history = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
        return True

    def _clear_outputs(self) -> None:
        """Remove the outputs of an earlier run before a fresh one, so old and new never mix."""
        D.barrier(self.env)
        if self.env.is_main:
            for path in (self.checkpoint_path, self.metrics_path, self.model_path):
                path.unlink(missing_ok=True)

    def _needs_find_unused(self) -> bool:
        """Whether some parameter can get no gradient in a step (then DDP must look for it).

        With the denoising head, yes: a step whose masking ratio masks all N tokens
        leaves no unmasked token for it (draw-dependent, so a single probe cannot see
        it). Otherwise one small forward/backward of the bare model on real data, with
        throw-away generators and a forked global RNG (the run's draws are untouched),
        finds parameters that no step uses.
        """
        if not self.env.distributed:
            return False
        if self.model_cfg.denoising_head:
            return True
        moments, context = self._collate(list(range(min(2, self.num_images))))
        with torch.random.fork_rng(devices=self._rng_devices()):
            tokens = self._tokens(moments, derive_seed(self.cfg.seed, "probe"))
            g = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.seed, "probe-model"))
            with self._autocast():
                out = self.model(tokens, context, generator=g)
            out.loss.backward()
        unused = any(p.grad is None for p in self.model.parameters() if p.requires_grad)
        self.model.zero_grad(set_to_none=True)
        flag = D.all_reduce_max(torch.tensor([float(unused)], device=self.device), self.env)
        return bool(flag.item())

    def _rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _collate(self, indices: list[int]) -> tuple[torch.Tensor, Any]:
        batch = torch.utils.data.default_collate([self.dataset[i] for i in indices])
        return _to_device(batch[0], self.device), _to_device(batch[1], self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tokens(self, moments: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator(moments.device).manual_seed(seed)
        latents = draw_latents(moments, self.dataset.scale, g)  # [b, C, h, w]
        return patchify(latents, self.model_cfg.patch_size)  # [b, N, d]

    def _loader(self) -> DataLoader:
        self.sampler = StepBatchSampler(
            self.num_images,
            self.cfg.batch_size,
            self.micro_batches,
            self.env.rank,
            self.env.world_size,
            self.cfg.seed,
            total_steps=self.total_steps,
            start_step=self.step,
            with_epoch=isinstance(self.dataset, TextLatentDataset),  # a caption per image per epoch
        )
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------------ one step

    def train_step(self, batches: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, float, int]:
        """One optimizer step over this process's slices; returns (components, grad norm, tokens)."""
        cfg, step = self.cfg, self.step
        self.ddp.train()
        local = len(batches)
        comps = torch.zeros(len(COMPONENTS), device=self.device)
        tokens_seen = 0
        for a, (moments, context) in enumerate(batches):
            m = self.sampler.slices()[a]
            moments, context = _to_device(moments, self.device), _to_device(context, self.device)
            # 1-2. Draw latents and run the slice; every draw keyed by (seed, step, slice).
            tokens = self._tokens(moments, derive_seed(cfg.seed, "latents", step, m))  # [b, N, d]
            torch.manual_seed(derive_seed(cfg.seed, "dropout", step, m))
            g = torch.Generator(self.device).manual_seed(derive_seed(cfg.seed, "model", step, m))
            sync = a == local - 1 or not self.env.distributed
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self._autocast():
                    out = self.forward_model(tokens, context, generator=g)
                (out.loss / local).backward()
            comps += (
                torch.stack([_item(out.loss), _item(out.diffusion), _item(out.refinement), _item(out.assessment)]).to(
                    self.device
                )
                / local
            )
            tokens_seen += tokens.shape[0] * tokens.shape[1]
        # 3. Loss components averaged over processes; a non-finite one stops the run.
        comps = D.all_reduce_mean(comps, self.env)
        # 4. Clip, step, schedule, EMA.
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        values = torch.cat([comps, grad_norm.reshape(1).to(comps)]).tolist()
        if not all(math.isfinite(v) for v in values):
            named = dict(zip((*COMPONENTS, "grad_norm"), values, strict=True))
            raise NonFiniteLossError(step, named)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        return comps.cpu(), values[-1], tokens_seen * self.env.world_size

    # ------------------------------------------------------------------ outputs

    def save_checkpoint(self) -> None:
        self.saved_timing = {**self.timing, "wall_s": self._wall()}
        if self.env.is_main:
            state = {
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "rng": {
                    "torch_cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
                "data": {
                    "seed": self.cfg.seed,
                    "batch_size": self.cfg.batch_size,
                    "micro_batches": self.micro_batches,
                    "next_position": self.step * self.cfg.batch_size,
                    "num_images": self.num_images,
                },
                "identity": self.identity,  # the configs, device, slicing, latent set and code
                "world_size": self.env.world_size,
                "timing": self.saved_timing,
            }
            # History first: a kill between the two writes then loses no record the checkpoint covers.
            _write_metrics(self.metrics_path, self.history)
            torch_save(state, self.checkpoint_path)
        D.barrier(self.env)

    def log_samples(self) -> None:
        """Sample a grid with the EMA model, decode it and log it as an MLflow image."""
        if self.decode is None or self.run is None:
            return
        from torchvision.utils import make_grid

        count = self.cfg.sample_count
        if self.model_cfg.context == "class":  # one image per class, cycling through the classes
            context = torch.arange(count, device=self.device) % self.model_cfg.num_classes  # [n]
        else:  # the captions of the first images of the data set
            count = min(count, self.num_images)
            _, context = self._collate(list(range(count)))  # [n, L, Dc]
        g = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.seed, "samples"))
        with torch.no_grad(), self._autocast():
            tokens = self.ema.module.sample(context, self.cfg.sample_settings, generator=g)  # [n, N, d]
            images = self.decode(tokens).float()  # [n, 3, H, W] in [-1, 1]
        grid = make_grid(to_uint8(images), nrow=math.ceil(math.sqrt(count)))  # [3, H', W'] uint8
        array = grid.permute(1, 2, 0).cpu().numpy()
        self.run.log_image(array, "samples", step=self.step)

    def final_metrics(self) -> dict[str, Any]:
        """Final record: step count, the last logged loss window, sizes and throughput of the whole run."""
        counts = self.model.param_counts()
        last = self.history[-1] if self.history else {}
        t = self.timing
        return {
            "steps": self.step,
            **{k: last.get(k, float("nan")) for k in COMPONENTS},
            "params_total": counts["total"],
            "params_by_component": counts,
            "tokens_per_s": t["tokens"] / t["train_s"] if t["train_s"] > 0 else None,
            "steps_per_s": t["steps"] / t["train_s"] if t["train_s"] > 0 else None,
            "wall_s": self._wall(),
        }

    def _wall(self) -> float:
        """Wall-clock seconds of the run, across resumptions (up to the last checkpoint of earlier calls)."""
        if self._wall_start is None:  # nothing ran in this call
            return self.timing["wall_s"]
        return self.timing["wall_s"] + time.perf_counter() - self._wall_start

    def _log(self, window: _Window, lr: float) -> None:
        """Turn the window into one record: metrics file, MLflow, progress bar."""
        record = {
            **window.means(),
            "step": self.step,
            "epoch": self.step * self.cfg.batch_size / self.num_images,
            "lr": lr,
            "wall_s": self._wall(),
        }
        self.history.append(record)
        if self.run is not None:
            self.run.log_metrics({k: v for k, v in record.items() if k != "step"}, step=self.step)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")

    # ------------------------------------------------------------------ the loop

    def run_loop(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.step >= self.total_steps and self._model_file_current():
            # A finished run of this identity: nothing to compute, nothing to write.
            self._wall_start = None
            return self._result()
        self._wall_start = time.perf_counter()
        window = _Window()
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train",
                        unit="step", dynamic_ncols=True)  # fmt: skip
        loader_iter = iter(self._loader())
        local = len(self.sampler.slices())
        try:
            while self.step < self.total_steps:
                batches = [next(loader_iter) for _ in range(local)]
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                t0 = time.perf_counter()
                comps, grad_norm, tokens = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.timing["train_s"] += dt
                self.timing["tokens"] += tokens
                self.timing["steps"] += 1
                window.add(comps.tolist(), grad_norm, tokens, dt)
                self.bar.update(1)
                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last:
                    self._log(window, lr)
                    window = _Window()
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.log_samples()
                if self.callback is not None:
                    self.callback(self.step, self.model, self.ema.module)
        finally:
            self.bar.close()
            if self.env.is_main:
                _write_metrics(self.metrics_path, self.history)
                if self.run is not None:
                    self.run.flush()
        # The run's record ends with its final checkpoint, so a rerun of the finished run reports the same.
        self.timing, self._wall_start = dict(self.saved_timing), None
        if self.env.is_main:
            save_checkpoint(
                self.model_path,
                self.model,
                self.ema.module,
                extra={"train": cfg.model_dump(mode="json"), "step": self.step, "identity": self.identity},
            )
        D.barrier(self.env)
        return self._result()

    def _model_file_current(self) -> bool:
        """Whether ``model.pt`` holds this run identity's final model (a finished run)."""
        try:
            extra = torch_load(self.model_path, mmap=True).get("extra") or {}
        except (OSError, ValueError, AttributeError):
            return False
        return extra.get("step") == self.step and not _identity_differences(extra.get("identity"), self.identity)

    def _result(self) -> TrainResult:
        return TrainResult(
            metrics=self.final_metrics(),
            model_path=self.model_path,
            checkpoint_path=self.checkpoint_path,
            metrics_path=self.metrics_path,
            history=list(self.history),
            resumed_from=self.resumed_from,
        )


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    latents_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    captions_dir: str | os.PathLike[str] | None = None,
    run: Any | None = None,
    callback: Callable[[int, nn.Module, nn.Module], None] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Train one model on a latent set, resuming from ``out_dir`` if a compatible checkpoint is there.

    Works alone or under ``torchrun`` (see :mod:`demar.distributed`): the process
    group is joined from the environment, and only rank 0 writes files, logs and
    shows progress. The caller's global RNG state is left as it was.

    Args:
        model_cfg: the :class:`demar.model.ModelConfig` of the model to build.
        train_cfg: the :class:`TrainConfig`.
        latents_dir: the latent set (:class:`demar.latents.LatentDataset` root).
        out_dir: where checkpoints, ``metrics.jsonl`` and ``model.pt`` go.
        captions_dir: the caption cache (:class:`demar.captions.CaptionCache` root) of a
            text-conditioned model (``model_cfg.context == "text"``); its captions are
            paired with the latents' images, each image with the captions ``images.json``
            beside the cache lists (without it, caption ``k`` is image ``k``'s) (default None;
            required for text).
        run: a :class:`demar.tracking.RunLogger` to log metrics and sample grids
            to (default None: local files only).
        callback: ``callback(step, model, ema_model)`` after every step (``step``
            counts completed steps); it may raise (e.g. to prune a trial): the run
            then stops with its last checkpoint intact. Under several processes it
            must behave the same on all of them (default None).
        decode: maps sampled tokens ``[B, N, d]`` to images ``[B, 3, H, W]`` in
            ``[-1, 1]`` for the sample grids; without it no grid is logged (default None).
        progress: show a tqdm bar on rank 0 (default True).
        resume: continue from ``out_dir/checkpoints/last.pt`` when it was written by the
            same run identity (default True); False starts fresh, removing earlier outputs.

    Raises:
        NonFiniteLossError: a step's loss or gradient norm is NaN or infinite.
        PermissionError: ``out_dir`` cannot be written to (checked before any work).
        demar.io.UnsafeFileError: ``last.pt`` holds objects other than tensors and plain values.
        ConfigError: ``micro_batches`` does not split over the processes, or
            ``grad_checkpointing`` cannot apply.
    """
    env = D.init_distributed(train_cfg.device)
    out_dir = Path(out_dir)
    try:
        if env.is_main:
            ensure_writable(out_dir)
            for path in remove_stale_temporaries(out_dir):
                _say(f"removed {path}, left by a killed write")
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            trainer = _Trainer(
                model_cfg,
                train_cfg,
                env,
                Path(latents_dir),
                None if captions_dir is None else Path(captions_dir),
                out_dir,
                run,
                callback,
                decode,
                progress,
                resume,
            )
            return trainer.run_loop()
    finally:
        D.teardown(env)
