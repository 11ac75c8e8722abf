"""Model-library timings: training steps of the four rows, sampling, and K/V caching.

Measures, at each requested size (default ``tiny`` and ``B``):

1. the time of one training step (forward, backward, AdamW) of each ablation row;
2. sampling time per image of the MAR row vs full De-MAR at equal
   autoregressive and diffusion steps;
3. the Transformer head's sampling with cached vs recomputed keys/values at
   100 diffusion steps, for a batch of images with M tokens each per
   autoregressive step (M = N / 64 is the average of MAR's 64-step default),
   without guidance and with it (cfg 2: a conditional and a null-context row per
   image, as the paper samples), eager and, where listed, under ``torch.compile``.

and writes the "Model library" section of ``BENCHMARKS.md`` (machine, command,
tables). Run: ``python benchmarks/bench_model.py [--sizes tiny B] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from demar.io import atomic_write_text
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig
from demar.sampler import SampleSettings

ROOT = Path(__file__).resolve().parents[1]

# Per size: data shape, training batch and timed steps, and the sampling settings of the
# MAR vs De-MAR comparison. At B the AR/diffusion steps (8 / 12) keep MAR's cost split of its
# defaults (64 / 100): about 70% backbone, 30% diffusion head, at a CPU-affordable total.
CPU_SETUP = {
    "data": {"token_dim": 8, "seq_len": 64, "num_classes": 10, "buffer_size": 16},
    "train_batch": 32,
    "warmup": 1,
    "repeats": 3,
    "sample_batch": 8,
    "sample": {"num_iter": 16, "diffusion_steps": 100, "cfg": 2.0},
    "sample_repeats": 5,
    "cache": ((8, 1), (8, 16)),
    "compiled": True,
    "cache_repeats": 5,
}
SETUPS = {
    "tiny": CPU_SETUP,
    "small": CPU_SETUP,
    "B": {
        "data": {},  # ImageNet 256: N = 256, d = 16, 1000 classes, buffer 64
        "train_batch": 1,
        "warmup": 0,
        "repeats": 1,
        "sample_batch": 1,
        "sample": {"num_iter": 8, "diffusion_steps": 12, "cfg": 1.0},
        "sample_repeats": 1,
        "cache": ((1, 4), (4, 4)),
        # A cached step at B is bound by reading the head's weights (matrix-vector work;
        # see the cost table), which compilation does not change.
        "compiled": False,
        "cache_repeats": 2,
    },
}


def machine() -> str:
    """One line describing where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), fp32 on CPU{load}"
    )


def build(size: str, row: str, **extra) -> DeMAR:
    cfg = ModelConfig.from_size(size, **SETUPS[size]["data"], **ABLATION_ROWS[row], **extra)
    torch.manual_seed(0)
    return DeMAR(cfg)


def time_train_step(size: str, row: str) -> tuple[float, int]:
    """(seconds per training step, parameters): forward + backward + AdamW, median of the timed steps."""
    setup = SETUPS[size]
    model = build(size, row).train()
    cfg = model.cfg
    b = setup["train_batch"]
    x = torch.randn(b, cfg.seq_len, cfg.token_dim)
    y = torch.randint(0, cfg.num_classes, (b,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(setup["warmup"] + setup["repeats"]):
        t0 = time.perf_counter()
        out = model(x, y, torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if i >= setup["warmup"]:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], model.param_counts()["total"]


def time_sampling(
    size: str, rows: tuple[str, ...], settings: SampleSettings
) -> tuple[dict[str, float], dict[str, float]]:
    """Per row: (seconds per image of a sampling run, seconds of the warm-up run).

    The timed figure is the best of the size's ``sample_repeats`` rounds, the rows taking
    turns within a round (so a slow spell of the machine hits all rows alike). The warm-up
    is one step, or with ``settings.compile`` one whole run, which compiles every shape the
    timed runs meet (its time is the compilation plus one run).
    """
    torch._dynamo.reset()  # compile from scratch, within the warm-up
    models = {row: build(size, row).eval() for row in rows}
    b = SETUPS[size]["sample_batch"]
    labels = torch.arange(b) % next(iter(models.values())).cfg.num_classes
    warmup = settings if settings.compile else settings.model_copy(update={"num_iter": 1, "diffusion_steps": 2})
    warmup_s = {}
    for row, model in models.items():
        t0 = time.perf_counter()
        model.sample(labels, warmup)
        warmup_s[row] = time.perf_counter() - t0
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(SETUPS[size]["sample_repeats"]):
        for row, model in models.items():
            t0 = time.perf_counter()
            model.sample(labels, settings, torch.Generator().manual_seed(0))
            best[row] = min(best[row], time.perf_counter() - t0)
    return {row: t / b for row, t in best.items()}, warmup_s


@torch.no_grad()
def step_costs(model: DeMAR, rows: int, tokens: int) -> tuple[float, float]:
    """(FLOPs of one cached diffusion step of the Transformer head, FLOPs of its keys/values)
    for ``rows`` rows of ``tokens`` tokens, counted by ``torch.utils.flop_counter``."""
    head, cfg = model.diffusion_head, model.cfg
    z_all = torch.randn(rows, cfg.seq_len, cfg.width)
    cond = head.prepare(z_all[:, :tokens], z_all)
    x_t = torch.randn(rows, tokens, cfg.token_dim)
    flops = []
    for fn in (lambda: head.denoise(x_t, torch.zeros(1, 1, dtype=torch.long), cond), lambda: head.keys_values(z_all)):
        with FlopCounterMode(display=False) as counter:
            fn()
        flops.append(counter.get_total_flops())
    return flops[0], flops[1]


def cached_step_weight_bytes(model: DeMAR) -> int:
    """Bytes of the Transformer head's weights that every cached diffusion step reads: all but
    the key/value projections and the condition embedding (both used once per call)."""
    head = model.diffusion_head
    skipped = {id(p) for block in head.blocks for p in block.attn.kv.parameters()}
    skipped |= {id(p) for p in head.cond_embed.parameters()}
    return sum(p.numel() * p.element_size() for p in head.parameters() if id(p) not in skipped)


@torch.no_grad()
def time_head_cache(
    model: DeMAR, images: int, tokens: int, *, cfg: float, steps: int, compile: bool, repeats: int
) -> tuple[float, float]:
    """(cached, uncached) seconds of the Transformer head sampling ``tokens`` tokens in each of
    ``images`` images (``2 x images`` rows when guided): best of ``repeats`` interleaved runs,
    after one untimed run of each (which also compiles)."""
    torch._dynamo.reset()  # each setting compiles from scratch, within the untimed runs
    rows = images * (2 if cfg != 1.0 else 1)
    z_all = torch.randn(rows, model.cfg.seq_len, model.cfg.width, generator=torch.Generator().manual_seed(0))
    z = z_all[:, :tokens]
    head = model.diffusion_head
    best = {True: float("inf"), False: float("inf")}
    for i in range(repeats + 1):
        for cache in (True, False):
            t0 = time.perf_counter()
            head.sample(z, z_all, num_steps=steps, temperature=1.0, cfg=cfg,
                        generator=torch.Generator().manual_seed(0), cache_kv=cache, compile=compile)  # fmt: skip
            if i:
                best[cache] = min(best[cache], time.perf_counter() - t0)
    return best[True], best[False]


def run(sizes: list[str]) -> str:
    """All measurements as the markdown body of the section."""
    lines = []
    for size in sizes:
        setup = SETUPS[size]
        probe = build(size, "mar").cfg
        lines.append(f"### {size} (N = {probe.seq_len}, d = {probe.token_dim}, width {probe.width})\n")

        lines.append(
            f"Training step (forward + backward + AdamW), batch {setup['train_batch']}, "
            f"median of {setup['repeats']} after {setup['warmup']} warm-up:\n"
        )
        lines.append("| row | params | s / step |")
        lines.append("|---|---|---|")
        for row in ABLATION_ROWS:
            t, params = time_train_step(size, row)
            lines.append(f"| {row} | {params / 1e6:.2f}M | {t:.3f} |")
            print(f"[{size}] train {row}: {t:.3f} s/step", flush=True)

        s = SampleSettings(**setup["sample"])
        lines.append(
            f"\nSampling, {setup['sample_batch']} image(s) per batch, {s.num_iter} autoregressive steps, "
            f"{s.diffusion_steps} diffusion steps, cfg {s.cfg}, best of {setup['sample_repeats']} run(s):\n"
        )
        lines.append("| row | run | s / image | vs MAR |")
        lines.append("|---|---|---|---|")
        compile_notes = []
        for compile in (False, True) if setup["compiled"] else (False,):
            run_kind = "compiled" if compile else "eager"
            times, warmup_s = time_sampling(size, ("mar", "demar"), s.model_copy(update={"compile": compile}))
            for row, t in times.items():
                lines.append(f"| {row} | {run_kind} | {t:.3f} | {t / times['mar']:.2f}x |")
                print(f"[{size}] sample {row} {run_kind}: {t:.3f} s/image", flush=True)
            if compile:
                compile_notes = [f"{row} {sec:.1f} s" for row, sec in warmup_s.items()]
        if compile_notes:
            lines.append(
                "\nThe compiled runs' untimed first run (compilation plus one run of the batch): "
                + ", ".join(compile_notes)
                + "."
            )

        repeats = setup["cache_repeats"]
        lines.append(
            "\nTransformer head alone, one autoregressive step's sampling at 100 diffusion steps, "
            "keys/values cached vs recomputed at every step (the uncached head also recomputes "
            f"norm(z_all)); best of {repeats} interleaved runs after one untimed run of each; "
            "cfg 2 samples a conditional and a null-context row per image:\n"
        )
        lines.append("| images | tokens per image | cfg | run | cached s | uncached s | speed-up |")
        lines.append("|---|---|---|---|---|---|---|")
        model = build(size, "demar").eval()
        for compile in (False, True) if setup["compiled"] else (False,):
            for images, m in setup["cache"]:
                for cfg in (1.0, 2.0):
                    cached, uncached = time_head_cache(
                        model, images, m, cfg=cfg, steps=100, compile=compile, repeats=repeats
                    )
                    run_kind = "compiled" if compile else "eager"
                    lines.append(
                        f"| {images} | {m} | {cfg:g} | {run_kind} | {cached:.3f} | {uncached:.3f} "
                        f"| {uncached / cached:.1f}x |"
                    )
                    label = f"[{size}] cache {images}x{m} cfg {cfg:g} {run_kind}"
                    print(f"{label}: {cached:.3f} / {uncached:.3f} s", flush=True)

        weights_mb = cached_step_weight_bytes(model) / 1e6
        lines.append(
            "\nWhat one diffusion step of the head costs (FLOPs counted by torch.utils.flop_counter; "
            f"every cached step also reads the head's {weights_mb:.1f} MB of weights outside the "
            "keys/values). The FLOP bound on the speed-up is (step + keys/values) / step:\n"
        )
        lines.append("| images | tokens per image | cfg | cached step MFLOP | keys/values MFLOP | FLOP bound |")
        lines.append("|---|---|---|---|---|---|")
        for images, m in setup["cache"]:
            for cfg in (1.0, 2.0):
                step, kv = step_costs(model, images * (2 if cfg != 1.0 else 1), m)
                lines.append(
                    f"| {images} | {m} | {cfg:g} | {step / 1e6:.1f} | {kv / 1e6:.1f} | {(step + kv) / step:.1f}x |"
                )
        lines.append("")
    return "\n".join(lines)


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a markdown file."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "B"], choices=list(SETUPS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    body = run(args.sizes)
    header = (
        f"Machine: {machine()}.\n\nCommand: `{command.strip()}` ({time.perf_counter() - t0:.0f} s).\n\n"
        "Timings vary with the load of other jobs on the machine (shown above); at B each row is a single "
        "step or run, so differences below about 40% between rows are within that noise.\n"
    )
    write_section(args.output, "Model library", header + "\n" + body)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
