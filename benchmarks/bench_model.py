"""Model-library timings: training steps of the four rows, sampling, and K/V caching.

Measures, at each requested size (default ``tiny`` and ``B``):

1. the time of one training step (forward, backward, AdamW) of each ablation row;
2. sampling time per image of the MAR row vs full De-MAR at equal
   autoregressive and diffusion steps;
3. the Transformer head's sampling with cached vs recomputed keys/values at
   100 diffusion steps, for a batch of images with M tokens each per
   autoregressive step (M = N / 64 is the average of MAR's 64-step default).

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

from demar.io import atomic_write_text
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig
from demar.sampler import SampleSettings

ROOT = Path(__file__).resolve().parents[1]

# Per size: data shape, training batch and timed steps, and the sampling settings of the
# MAR vs De-MAR comparison. At B the AR/diffusion steps (8 / 12) keep MAR's cost split of its
# defaults (64 / 100): about 70% backbone, 30% diffusion head, at a CPU-affordable total.
SETUPS = {
    "tiny": {
        "data": {"token_dim": 8, "seq_len": 64, "num_classes": 10, "buffer_size": 16},
        "train_batch": 32,
        "warmup": 1,
        "repeats": 3,
        "sample_batch": 8,
        "sample": {"num_iter": 16, "diffusion_steps": 100, "cfg": 2.0},
        "cache": ((8, 1), (8, 16)),
    },
    "small": {
        "data": {"token_dim": 8, "seq_len": 64, "num_classes": 10, "buffer_size": 16},
        "train_batch": 32,
        "warmup": 1,
        "repeats": 3,
        "sample_batch": 8,
        "sample": {"num_iter": 16, "diffusion_steps": 100, "cfg": 2.0},
        "cache": ((8, 1), (8, 16)),
    },
    "B": {
        "data": {},  # ImageNet 256: N = 256, d = 16, 1000 classes, buffer 64
        "train_batch": 1,
        "warmup": 0,
        "repeats": 1,
        "sample_batch": 1,
        "sample": {"num_iter": 8, "diffusion_steps": 12, "cfg": 1.0},
        "cache": ((1, 4), (4, 4)),
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


def time_sampling(size: str, row: str, settings: SampleSettings) -> float:
    """Seconds per image of one sampling run (after a one-step warm-up)."""
    model = build(size, row).eval()
    b = SETUPS[size]["sample_batch"]
    labels = torch.arange(b) % model.cfg.num_classes
    model.sample(labels, settings.model_copy(update={"num_iter": 1, "diffusion_steps": 2}))
    t0 = time.perf_counter()
    model.sample(labels, settings, torch.Generator().manual_seed(0))
    return (time.perf_counter() - t0) / b


@torch.no_grad()
def time_head_cache(size: str, images: int, tokens: int, steps: int) -> tuple[float, float]:
    """Transformer head sampling of ``tokens`` tokens in each of ``images`` images: (cached, uncached) seconds."""
    model = build(size, "demar").eval()
    cfg, head = model.cfg, model.diffusion_head
    z_all = torch.randn(images, cfg.seq_len, cfg.width)
    z = z_all[:, :tokens]
    out = []
    for cache in (True, False):
        head.sample(z, z_all, num_steps=2, temperature=1.0, cfg=1.0, generator=None, cache_kv=cache)  # warm-up
        t0 = time.perf_counter()
        head.sample(z, z_all, num_steps=steps, temperature=1.0, cfg=1.0,
                    generator=torch.Generator().manual_seed(0), cache_kv=cache)  # fmt: skip
        out.append(time.perf_counter() - t0)
    return out[0], out[1]


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
            f"{s.diffusion_steps} diffusion steps, cfg {s.cfg}:\n"
        )
        lines.append("| row | s / image | vs MAR |")
        lines.append("|---|---|---|")
        base = None
        for row in ("mar", "demar"):
            t = time_sampling(size, row, s)
            base = base or t
            lines.append(f"| {row} | {t:.3f} | {t / base:.2f}x |")
            print(f"[{size}] sample {row}: {t:.3f} s/image", flush=True)

        lines.append(
            "\nTransformer head alone, one autoregressive step's sampling at 100 diffusion steps, "
            "keys/values cached vs recomputed at every step:\n"
        )
        lines.append("| images | tokens per image | cached s | uncached s | speed-up |")
        lines.append("|---|---|---|---|---|")
        for images, m in setup["cache"]:
            cached, uncached = time_head_cache(size, images, m, 100)
            lines.append(f"| {images} | {m} | {cached:.3f} | {uncached:.3f} | {uncached / cached:.1f}x |")
            print(f"[{size}] cache {images}x{m}: {cached:.3f} vs {uncached:.3f}", flush=True)
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
