"""How much faster the embedded preset's training step could get on this machine, measured.

For each row (default: the four ablation rows) at the embedded preset's shape
(params.yaml: the row's model and batch), one process and one thread, this measures:

- the engine's step (forward, backward, clipping, fused AdamW, EMA), median of the rounds;
- the step's matrix-multiply work: the share of the step's CPU time spent in ``mm``,
  ``addmm`` and ``bmm`` (``torch.profiler``), their FLOPs (``torch.utils.flop_counter``)
  and the rate they run at, against this machine's fp32 matrix-multiply peak measured
  in the same run (2048 x 2048) and against the rate of the step's most common shape;
- ``torch.compile`` of the model's repeated blocks (backbone blocks and the head's
  residual blocks, where the step's elementwise ops sit) against eager, after compiling;
- the bound that follows: if every op other than the matrix multiplies took no time,
  the step would run ``1 / share`` times faster. Times the processes that run side by
  side (``--jobs``, one per core), that bounds the training throughput summed over seeds
  against one eager process.

Writes the "Bound on the training step" section of ``BENCHMARKS.md`` with ``--write``.
Run: ``python benchmarks/bench_step_bound.py [--rows mar demar] [--rounds 30] [--write]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import machine, write_section
from bench_vs_mar import matmul_peak, our_step, step_flop_counts

from demar.model import ABLATION_ROWS, DeMAR
from demar.params import load_params

ROOT = Path(__file__).resolve().parents[1]
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
TITLE = "Bound on the training step"


def median_seconds(step: Callable[[], None], rounds: int, warmup: int) -> float:
    """Median wall seconds of ``step`` over ``rounds`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_share(step: Callable[[], None], calls: int) -> tuple[float, float]:
    """(share of the steps' self CPU time in matrix multiplies, their seconds per step) under ``torch.profiler``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return matmul / total, matmul / 1e6 / calls


def matmul_flops(model: DeMAR, batch: int) -> int:
    """Matrix-multiply FLOPs of one forward + backward at ``batch``."""
    per_op = step_flop_counts(model, batch)
    return sum(per_op.get(op, 0) for op in ("aten.mm", "aten.addmm", "aten.bmm"))


def shape_rate(m: int, k: int, n: int, repeats: int = 200) -> float:
    """FLOP/s of one ``[m, k] @ [k, n]`` fp32 matrix multiply (median of ``repeats``)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / median_seconds(lambda: a @ b, repeats, warmup=5)


def compile_blocks(model: DeMAR) -> None:
    """``torch.compile`` every repeated block of the backbone and of the diffusion head, in place."""
    for blocks in (model.backbone.encoder_blocks, model.backbone.decoder_blocks):
        for block in blocks:
            block.compile()
    for child in model.diffusion_head.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                block.compile()


def measure(params: Any, row: str, rounds: int, warmup: int, compiled: bool) -> dict[str, Any]:
    """Every number of one row's line of the table."""
    model_cfg, train_cfg = params.row_model(row), params.row_train(row)
    batch = train_cfg.batch_size
    # The engine's optimizer settings (fused AdamW) on a fixed random batch.
    hyper = dict(lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay,
                 grad_clip=train_cfg.grad_clip, ema_rate=train_cfg.ema_rate, fused=True)  # fmt: skip

    def fresh() -> DeMAR:
        torch.manual_seed(0)
        return DeMAR(model_cfg)

    model = fresh()
    mm = matmul_flops(model, batch)
    step = our_step(model, batch, 0, **hyper)
    eager = median_seconds(step, rounds, warmup)
    share, matmul_s = matmul_share(step, calls=max(rounds // 3, 2))
    result = {
        "row": row, "params": sum(p.numel() for p in model.parameters()), "batch": batch, "eager_s": eager,
        "mm_gflop": mm / 1e9, "share": share, "mm_rate": mm / matmul_s,
        "compiled_s": None,
    }  # fmt: skip
    if compiled:
        model = fresh()
        compile_blocks(model)
        step = our_step(model, batch, 0, **hyper)
        step()  # the one-off compilation, untimed; the masking draws a few token counts, so warm up too
        result["compiled_s"] = median_seconds(step, rounds, warmup)
    return result


def report(results: list[dict[str, Any]], peak: float, shape: tuple[int, int, int], shape_flops: float,
           jobs: int, command: str, seconds: float) -> str:  # fmt: skip
    """The BENCHMARKS.md section."""
    m, k, n = shape
    lines = [
        f"Machine: {machine()}. Measured fp32 matrix-multiply rate, same thread: {peak / 1e9:.1f} GFLOP/s at "
        f"2048 x 2048 x 2048, {shape_flops / 1e9:.1f} GFLOP/s at {m} x {k} x {n} (a backbone projection at the "
        "preset's batch).",
        "",
        f"Command: `{command.strip()}` ({seconds:.0f} s).",
        "",
        "One process, one thread, the engine's step (forward, backward, clipping, fused AdamW, EMA) on a fixed "
        "batch at the embedded preset's shape; median of the rounds. Matmul share: the step's self CPU time in "
        "`mm`/`addmm`/`bmm` under `torch.profiler`. Matmul rate: their FLOPs over their profiled time. "
        "Bound: the step's "
        f"speed-up if every other op took no time (1 / share), and that times {jobs} processes side by side.",
        "",
        "| row | params | batch | s / step | matmul GFLOP / step | matmul share | matmul GFLOP/s | of 2048 peak | "
        f"compiled blocks vs eager | bound, 1 process | bound, {jobs} processes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        comp = f"{r['eager_s'] / r['compiled_s']:.2f}x" if r["compiled_s"] else "not run"
        lines.append(
            f"| {r['row']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['eager_s']:.3f} | {r['mm_gflop']:.2f} | "
            f"{r['share']:.0%} | {r['mm_rate'] / 1e9:.1f} | {r['mm_rate'] / peak:.0%} | "
            f"{comp} | {1 / r['share']:.2f}x | {jobs / r['share']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ABLATION_ROWS), help="rows of params.yaml")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side for the bound (one per core)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled run")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--write", action="store_true", help="write the section of --output")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/bench_step_bound.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    params = load_params(args.params)
    peak = matmul_peak()
    model_cfg, batch = params.row_model(args.rows[0]), params.row_train(args.rows[0]).batch_size
    shape = (batch * model_cfg.seq_len, model_cfg.width, 3 * model_cfg.width)
    shape_flops = shape_rate(*shape)
    results = []
    for row in args.rows:
        results.append(measure(params, row, args.rounds, args.warmup, args.compile))
        r = results[-1]
        print(f"{row}: {r['eager_s']:.3f} s / step, matmul share {r['share']:.0%}", flush=True)
    body = report(results, peak, shape, shape_flops, args.jobs, command, time.perf_counter() - t0)
    print(body)
    if args.write:
        write_section(args.output, TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
