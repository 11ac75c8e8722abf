"""One-call GPU check of the model library: training throughput, compilation, DDP, sampling, bf16.

Measures, for the MAR row and full De-MAR at size B (N = 256 tokens of d = 16, 1000 classes),
through the project's own code (:class:`demar.model.DeMAR`, :func:`demar.train.param_groups`,
:mod:`demar.distributed`, :meth:`DeMAR.sample`):

1. ``matmul_peak``: the measured peak of a large bf16 matmul (fp32 on the CPU);
2. ``train_<row>``: one training step (forward, backward, gradient clipping, AdamW) under
   bf16 autocast: tokens/s, seconds a step, MFU and peak memory. MFU is the step's FLOPs
   (``torch.utils.flop_counter``, forward + backward, counted on the same draws) over the
   step time and the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS` by device name,
   else the measured matmul peak);
3. ``bf16_vs_fp32_<row>``: the relative difference of the loss of one batch in fp32 and
   under bf16 autocast, same weights and same draws (the zero-initialised output layers
   drawn at random first, or the heads would predict zero in both);
4. ``sample_<row>``: images/s at 64 autoregressive and 100 diffusion steps with guidance;
5. ``ddp_mar``: a few DDP training steps of the MAR row in a ``torchrun`` subprocess
   (NCCL on CUDA, gloo on the CPU): seconds a step, and whether the loss stays finite.
   With one process (``--ddp-procs``, default 1) the project's ``init_distributed`` and
   ``wrap_ddp`` run without a process group, so the worker makes the group itself;
6. ``compiled_<row>``: the training step of 2. through ``torch.compile``, the compilation
   (the warm-up steps, less as many steady steps) timed apart from the steps.

The parts run in that order. Once ``--budget-s`` seconds have passed, the remaining parts
are recorded as skipped (a compiled part needs 120 s left, or as long as the previous one
took), so the whole check fits in 8 minutes; a part that raises is recorded with its error
and the others still run.

Run on a CUDA machine::

    python benchmarks/gpu_check.py [--out benchmarks/out/gpu_check] [--budget-s 420]

(``benchmarks/gpu_check.sh`` takes the same arguments), and on a CPU, where every part
runs at a tiny size (micro, N = 16, d = 8, 10 classes, batch 2, one or two steps, 2 autoregressive and 2 diffusion steps, no autocast but in the
bf16 comparison, gloo, dynamo's ``eager`` backend, MFU against the measured fp32 matmul
peak) in well under a minute, so that every code path of the script is exercised::

    python benchmarks/gpu_check.py --dry

Writes ``gpu_check.json`` (every measurement, device, torch version, settings, and
``"dry"``) and ``gpu_check.md`` (one table) to ``--out``, and prints one line per part.
Exit code 0 when every part ran or was skipped, 1 when a part failed, 2 without CUDA and
without ``--dry``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from demar.distributed import (
    DistEnv,
    all_reduce_mean,
    init_distributed,
    resolve_device,
    teardown,
    wrap_ddp,
)
from demar.io import atomic_write_text, read_json, write_json
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig
from demar.sampler import SampleSettings
from demar.train import param_groups
from demar.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("mar", "demar")

# Dense bf16 peaks (TFLOP/s) by a substring of torch.cuda.get_device_name(), first match wins
# (so "H100 PCIe" is tried before "H100", the SXM part).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)

# What each mode runs. "gpu": De-MAR-B with ModelConfig's defaults (ImageNet 256 with KL-16:
# N = 256, d = 16, 1000 classes, 64 buffer tokens) at MAR's per-GPU batch of 64. "dry": the
# same parts at a size that runs in seconds on a CPU.
SETUPS: dict[str, dict[str, Any]] = {
    "gpu": {
        "size": "B",
        "model": {},
        "batch": 64,
        "warmup": 3,  # untimed steps; compiled, the compilation and the recompilation for dynamic shapes
        "steps": 10,
        "compile_backend": "inductor",
        # A compiled part starts only with this much of the budget left: compiling B's forward
        # and backward twice (static shapes, then dynamic ones) takes a minute or two.
        "compile_reserve_s": 120,
        "ddp_warmup": 2,
        "ddp_steps": 5,
        "sample_batch": 64,
        "sample": {"num_iter": 64, "diffusion_steps": 100, "cfg": 4.0},
        "matmul": {"n": 8192, "iters": 20, "dtype": "bfloat16"},
    },
    "dry": {
        "size": "micro",
        # A fixed masking ratio keeps the token counts, hence the compiled graph's shapes, the same
        # every step: no recompilation for dynamic shapes, which would double the compiled parts' time.
        "model": {
            "token_dim": 8,
            "seq_len": 16,
            "num_classes": 10,
            "buffer_size": 4,
            "masking": {"mask_ratio_min": 0.75, "mask_ratio_max": 0.75},
        },
        "batch": 2,
        "warmup": 2,
        "steps": 1,
        "compile_backend": "eager",  # dynamo's tracing without code generation: seconds, not minutes
        "compile_reserve_s": 0,
        "ddp_warmup": 1,
        "ddp_steps": 1,
        "sample_batch": 2,
        "sample": {"num_iter": 2, "diffusion_steps": 2, "cfg": 4.0},
        "matmul": {"n": 256, "iters": 5, "dtype": "float32"},
    },
}
SEED = 0
TIMED_SEED = 1000  # the timed steps use seeds TIMED_SEED + i, the warm-up steps i


# ---------------------------------------------------------------------- helpers


def model_config(setup: dict[str, Any], row: str) -> ModelConfig:
    """The row's config at the setup's size."""
    return ModelConfig.from_size(setup["size"], **setup["model"], **ABLATION_ROWS[row])


def build_model(setup: dict[str, Any], row: str, device: torch.device) -> DeMAR:
    """The row's model with seeded initial weights, on ``device``."""
    torch.manual_seed(SEED)
    return DeMAR(model_config(setup, row)).to(device)


def random_batch(cfg: ModelConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded tokens ``[B, N, d]`` and labels ``[B]`` on ``device``."""
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randn(batch, cfg.seq_len, cfg.token_dim, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return tokens.to(device), labels.to(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on the CPU (the training engine's rule)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: nn.Module, batch: int) -> tuple[torch.optim.Optimizer, float]:
    """AdamW with MAR's recipe (:class:`TrainConfig`'s defaults) and the gradient-clipping norm."""
    cfg = TrainConfig(batch_size=batch)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    return optimizer, cfg.grad_clip


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """One training step (forward, backward, clipping, AdamW); returns the loss (detached)."""
    torch.manual_seed(seed)  # dropout
    g = torch.Generator(tokens.device).manual_seed(seed)  # masking, label drop, diffusion draws
    with autocast(tokens.device):
        out = model(tokens, labels, generator=g)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return out.loss.detach()


def step_flops(model: DeMAR, tokens: torch.Tensor, labels: torch.Tensor, seed: int) -> int:
    """FLOPs of one step's forward and backward with the draws of ``seed`` (AdamW's are negligible)."""
    with FlopCounterMode(display=False) as counter:
        with autocast(tokens.device):
            out = model(tokens, labels, generator=torch.Generator(tokens.device).manual_seed(seed))
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(device: torch.device, matmul: dict[str, Any] | None) -> tuple[float | None, str]:
    """(The peak MFU is measured against, where it comes from): the table's dense bf16 peak
    of a known GPU, else the measured matmul peak (None when that part did not run)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"table ({key} dense bf16)"
    measured = (matmul or {}).get("tflops")
    if measured is None:
        return None, "none (the matmul part did not run)"
    return measured, f"measured {matmul['dtype']} matmul"


def free_memory() -> None:
    """Release what the last part left, so that the next one starts from an empty device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- the parts


def measure_matmul_peak(setup: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """TFLOP/s of repeated ``n x n`` matmuls in the setup's dtype, after two untimed ones."""
    n, iters, dtype = setup["matmul"]["n"], setup["matmul"]["iters"], setup["matmul"]["dtype"]
    g = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=g).to(device, getattr(torch, dtype))
    b = torch.randn(n, n, generator=g).to(device, getattr(torch, dtype))
    for _ in range(2):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"tflops": 2 * n**3 * iters / seconds / 1e12, "dtype": dtype, "n": n}


def measure_training(
    setup: dict[str, Any],
    device: torch.device,
    row: str,
    peak: tuple[float | None, str],
    compile_backend: str | None = None,
) -> dict[str, Any]:
    """Training-step throughput of one row, eager or through ``torch.compile``.

    The warm-up steps are untimed (with ``compile_backend``, they hold the compilation and
    the recompilation for a second shape, as the masking ratio changes the number of masked
    tokens); the timed steps' figures are medians, each step's MFU its own FLOPs over its time.
    """
    model = build_model(setup, row, device).train()
    tokens, labels = random_batch(model.cfg, setup["batch"], device)
    optimizer, grad_clip = make_optimizer(model, setup["batch"])
    seeds = [TIMED_SEED + i for i in range(setup["steps"])]
    flops = [step_flops(model, tokens, labels, s) for s in seeds]
    if compile_backend is not None:
        torch._dynamo.reset()  # compile from scratch, within the warm-up
    runner = model if compile_backend is None else torch.compile(model, backend=compile_backend)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(setup["warmup"]):
        train_step(runner, optimizer, grad_clip, tokens, labels, seed=i)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    times, losses = [], []
    for seed in seeds:
        t0 = time.perf_counter()
        losses.append(train_step(runner, optimizer, grad_clip, tokens, labels, seed))
        synchronize(device)
        times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    loss_values = [x.item() for x in losses]
    tflops = statistics.median(f / t / 1e12 for f, t in zip(flops, times, strict=True))
    result = {
        "params_m": model.param_counts()["total"] / 1e6,
        "batch": setup["batch"],
        "s_per_step": step_s,
        "tokens_per_s": setup["batch"] * model.cfg.seq_len / step_s,
        "tflops": tflops,
        "mfu": None if peak[0] is None else tflops / peak[0],
        "mfu_peak_tflops": peak[0],
        "mfu_peak_source": peak[1],
        "gflops_per_step": statistics.median(flops) / 1e9,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": statistics.mean(loss_values),
        "loss_finite": all(math.isfinite(x) for x in loss_values),
        "autocast": "bf16" if device.type == "cuda" else "none",
    }
    if compile_backend is None:
        result["warmup_s"] = warmup_s
    else:
        # The warm-up less the same number of steady steps: the compilation's own time.
        result.update(compile_backend=compile_backend, warmup_s=warmup_s,
                      compile_s=max(warmup_s - setup["warmup"] * step_s, 0.0))  # fmt: skip
    return result


def randomize_zero_weights(model: nn.Module) -> int:
    """Draw every all-zero weight from N(0, 0.02^2) (seeded); returns how many tensors.

    At initialisation the heads' output layers and adaLN modulations are zero (DiT's init),
    so the heads predict zero whatever the backbone computes and the loss would not see the
    backbone's precision at all.
    """
    g = torch.Generator().manual_seed(SEED)
    changed = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                changed += 1
    return changed


@torch.no_grad()
def measure_bf16_vs_fp32(setup: dict[str, Any], device: torch.device, row: str) -> dict[str, Any]:
    """The loss of one batch in fp32 and under bf16 autocast, same weights and draws.

    The model is in eval mode (no dropout, whose draws come from the global RNG); every
    other draw comes from a generator of the same seed in both passes. bf16 autocast runs
    on the CPU too here: this part is about bf16.
    """
    model = build_model(setup, row, device).eval()
    randomized = randomize_zero_weights(model)
    tokens, labels = random_batch(model.cfg, setup["batch"], device)

    def loss(bf16: bool) -> float:
        g = torch.Generator(device).manual_seed(SEED)
        cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with cast:
            return model(tokens, labels, generator=g).loss.float().item()

    fp32, bf16 = loss(bf16=False), loss(bf16=True)
    return {
        "loss_fp32": fp32,
        "loss_bf16": bf16,
        "rel_diff": abs(bf16 - fp32) / abs(fp32),
        "batch": setup["batch"],
        "zero_weights_randomized": randomized,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def measure_sampling(setup: dict[str, Any], device: torch.device, row: str) -> dict[str, Any]:
    """Images/s of one sampling run of the setup's batch, after a short untimed run."""
    model = build_model(setup, row, device).eval()
    settings = SampleSettings(**setup["sample"])
    batch = setup["sample_batch"]
    labels = (torch.arange(batch) % model.cfg.num_classes).to(device)
    with autocast(device):
        model.sample(labels, settings.model_copy(update={"num_iter": 1, "diffusion_steps": 2}))
        synchronize(device)
        t0 = time.perf_counter()
        tokens = model.sample(labels, settings, torch.Generator(device).manual_seed(SEED))
        synchronize(device)
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": batch / seconds,
        "s_per_image": seconds / batch,
        "batch": batch,
        "ar_steps": settings.num_iter,
        "diffusion_steps": settings.diffusion_steps,
        "cfg": settings.cfg,
        "tokens_finite": bool(torch.isfinite(tokens).all()),
        "autocast": "bf16" if device.type == "cuda" else "none",
    }


def measure_ddp(dry: bool, procs: int, timeout_s: float) -> dict[str, Any]:
    """Run :func:`ddp_worker` under ``torchrun`` in a subprocess and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               str(Path(__file__).resolve()), "--ddp-worker", "--result", str(result)]  # fmt: skip
        if dry:
            cmd.append("--dry")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        # A session of its own, so that a timeout ends torchrun's workers too, not only torchrun.
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimeoutError(f"torchrun did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            tail = output.strip().splitlines()[-15:]
            raise RuntimeError(f"torchrun exited with code {proc.returncode}:\n" + "\n".join(tail))
        out = read_json(result)
    out["subprocess_s"] = time.perf_counter() - t0
    return out


def ddp_worker(setup: dict[str, Any], dry: bool, result_path: Path) -> None:
    """A few DDP training steps of the MAR row in a ``torchrun`` process; rank 0 writes the JSON.

    Under ``torchrun`` with several processes this is the training engine's road:
    :func:`init_distributed` creates the process group and :func:`wrap_ddp` wraps the model.
    With one process both stand aside (single-process training), so the worker creates the
    process group itself, with the backend ``init_distributed`` would pick, and wraps the
    model in DDP directly: NCCL (gloo) and DDP's gradient all-reduce then still run.
    """
    pref = "cpu" if dry else "cuda"
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = resolve_device(pref, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                device_id=device if device.type == "cuda" else None)  # fmt: skip
        created = True
    env = init_distributed(pref)  # reuses a group created above
    try:
        model = build_model(setup, "mar", env.device).train()
        if env.distributed:
            ddp = wrap_ddp(model, env)
            wrapper = "demar.distributed.wrap_ddp"
        else:
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
            wrapper = "DistributedDataParallel (one process: wrap_ddp returns the bare model)"
        tokens, labels = random_batch(model.cfg, setup["batch"], env.device)
        optimizer, grad_clip = make_optimizer(model, setup["batch"] * env.world_size)
        for i in range(setup["ddp_warmup"]):
            train_step(ddp, optimizer, grad_clip, tokens, labels, seed=i + 100 * env.rank)
        times, losses = [], []
        for i in range(setup["ddp_steps"]):
            synchronize(env.device)
            t0 = time.perf_counter()
            losses.append(train_step(ddp, optimizer, grad_clip, tokens, labels, TIMED_SEED + i + 100 * env.rank))
            synchronize(env.device)
            times.append(time.perf_counter() - t0)
        # Each process's losses averaged over all of them (the engine's reduction).
        mean = mean_over_processes(torch.stack(losses).float(), env).tolist()
        if env.is_main:
            write_json(result_path, {
                "s_per_step": statistics.median(times),
                "loss": statistics.mean(mean),
                "loss_finite": all(math.isfinite(x) for x in mean),
                "steps": setup["ddp_steps"],
                "batch_per_process": setup["batch"],
                "world_size": dist.get_world_size(),
                "backend": str(dist.get_backend()),
                "wrapper": wrapper,
            })  # fmt: skip
    finally:
        teardown(env)
        if created:
            dist.destroy_process_group()


def mean_over_processes(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """:func:`demar.distributed.all_reduce_mean`, an all-reduce over the group even with one process."""
    if env.distributed:
        return all_reduce_mean(values, env)
    out = values.detach().clone()
    dist.all_reduce(out)  # one process: the sum is the mean
    return out


# ---------------------------------------------------------------------- running and reporting


@dataclass(frozen=True)
class Part:
    """One measurement of the check.

    Attributes:
        name: the part's key in the report.
        run: the measurement; returns its figures.
        needs_s: seconds of the budget the part needs left to start (asked just before it would).
    """

    name: str
    run: Callable[[], dict[str, Any]]
    needs_s: Callable[[], float] = lambda: 0.0


def run_parts(parts: list[Part], budget_s: float, results: dict[str, dict[str, Any]]) -> None:
    """Run each part into ``results`` unless the time budget is spent; record skips and errors; print a line each."""
    start = time.perf_counter()
    for i, part in enumerate(parts, 1):
        elapsed, needs_s = time.perf_counter() - start, part.needs_s()
        if elapsed + needs_s > budget_s:
            needs = f", the part needs {needs_s:.0f} s" if needs_s else ""
            reason = f"{elapsed:.0f} s of the {budget_s:.0f} s budget spent{needs}"
            results[part.name] = {"status": "skipped", "reason": reason}
        else:
            t0 = time.perf_counter()
            try:
                results[part.name] = {"status": "ok", **part.run()}
            except Exception as err:  # noqa: BLE001 - one failing part must not stop the others
                results[part.name] = {"status": "error", "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()}  # fmt: skip
                print(results[part.name]["traceback"], file=sys.stderr, flush=True)
            finally:
                free_memory()
            results[part.name]["wall_s"] = time.perf_counter() - t0
        print(f"[{i}/{len(parts)}] {part.name}: {summary(results[part.name])}", flush=True)


def figures(result: dict[str, Any]) -> str:
    """A part's scalar figures, ``key value`` comma-separated."""
    fields = []
    for key, value in result.items():
        if key in ("status", "wall_s") or isinstance(value, (list, dict)) or value is None:
            continue
        fields.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(fields)


def summary(result: dict[str, Any]) -> str:
    """One line of a part's outcome: its figures, or why it did not run."""
    if result["status"] == "skipped":
        return f"skipped: {result['reason']}"
    if result["status"] == "error":
        return f"error: {result['error'].splitlines()[0]}"
    return f"ok ({result['wall_s']:.1f} s): {figures(result)}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a short header and one table, a row per part."""
    lines = [
        f"# GPU check{' (dry run on the CPU)' if report['dry'] else ''}",
        "",
        (
            f"Device: {report['device']}; torch {report['torch']}; size {report['settings']['size']}; "
            f"{report['wall_s']:.0f} s in all."
        ),
        "",
        "| part | status | s | result |",
        "|---|---|---|---|",
    ]
    for name, result in report["parts"].items():
        status = result["status"]
        wall = f"{result['wall_s']:.1f}" if "wall_s" in result else "-"
        text = figures(result) if status == "ok" else summary(result)
        lines.append(f"| {name} | {status} | {wall} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)"


def check(setup: dict[str, Any], device: torch.device, dry: bool, budget_s: float, ddp_procs: int) -> dict[str, Any]:
    """Every part, in order of importance; returns the whole report."""
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}

    def peak() -> tuple[float | None, str]:
        matmul = results.get("matmul_peak", {})
        return peak_tflops(device, matmul if matmul.get("status") == "ok" else None)

    def ddp_timeout() -> float:
        """What is left of the budget, plus 30 s (at least 30 s): the DDP subprocess's time limit."""
        return max(budget_s + 30 - (time.perf_counter() - start), 30.0)

    def compile_needs() -> float:
        """The setup's reserve, or the longest compiled part so far if that took longer."""
        done = [r.get("wall_s", 0.0) for name, r in results.items() if name.startswith("compiled_")]
        return max([setup["compile_reserve_s"], *done])

    backend = setup["compile_backend"]
    parts = [Part("matmul_peak", lambda: measure_matmul_peak(setup, device))]
    parts += [Part(f"train_{r}", lambda r=r: measure_training(setup, device, r, peak())) for r in ROWS]
    parts += [Part(f"bf16_vs_fp32_{r}", lambda r=r: measure_bf16_vs_fp32(setup, device, r)) for r in ROWS]
    parts += [Part(f"sample_{r}", lambda r=r: measure_sampling(setup, device, r)) for r in ROWS]
    parts += [Part("ddp_mar", lambda: measure_ddp(dry, ddp_procs, ddp_timeout()))]
    parts += [Part(f"compiled_{r}", lambda r=r: measure_training(setup, device, r, peak(), backend), compile_needs)
              for r in ROWS]  # fmt: skip
    run_parts(parts, budget_s, results)  # in order, so that peak() sees the matmul part's result
    return {
        "dry": dry,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {**setup, "budget_s": budget_s, "ddp_procs": ddp_procs, "rows": list(ROWS)},
        "parts": results,
        "wall_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="run every part on the CPU at a tiny size")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_check")
    parser.add_argument("--budget-s", type=float, default=420.0, help="parts starting later are skipped (420)")
    parser.add_argument("--ddp-procs", type=int, default=1, help="torchrun processes of the DDP part (1)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup = SETUPS["dry" if args.dry else "gpu"]

    if args.ddp_worker:
        ddp_worker(setup, args.dry, args.result)
        return 0
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; pass --dry to run every part on the CPU", file=sys.stderr)
        return 2

    device = torch.device("cpu") if args.dry else resolve_device("cuda")
    report = check(setup, device, args.dry, args.budget_s, args.ddp_procs)
    table = markdown(report)
    write_json(args.out / "gpu_check.json", report)
    atomic_write_text(args.out / "gpu_check.md", table)
    print("\n" + table + f"\nwrote {args.out / 'gpu_check.json'} and gpu_check.md")
    return 1 if any(r["status"] == "error" for r in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
