"""Training-engine throughput: tokens/s and steps/s of each ablation row through :func:`demar.train.train`.

Unlike the "Model library" timings (one bare forward/backward/AdamW step), these
run the whole engine on a real latent cache: data loading, latent drawing,
patchify, forward, backward, clipping, AdamW, EMA, metric logging. For each size
(default ``tiny`` and ``B``) and each row it trains a few steps of a small batch
and reports the mean over the steps after the first (the warm-up). The latent
cache is written by :func:`demar.latents.extract_latents` from random images
with a small random tokenizer of the right latent shape.

Writes the "Training" section of ``BENCHMARKS.md`` (only that section).
Run: ``python benchmarks/bench_train.py [--sizes tiny B] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import machine, write_section

from demar.latents import LatentsConfig, extract_latents
from demar.model import ABLATION_ROWS
from demar.tokenizer import Tokenizer, TokenizerConfig
from demar.params import RowConfig, row_model_config
from demar.train import train
from demar.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# Per size: latent shape (image side, tokenizer levels, channels), shared model knobs,
# batch and steps. tiny = the embedded preset's shape (8x8 latents, N = 64); B = ImageNet
# 256 with KL-16 (16x16x16 latents, N = 256, 1000 classes).
SETUPS = {
    "tiny": {
        "image": 32, "levels": 3, "channels": 8,
        "model": {"token_dim": 8, "seq_len": 64, "num_classes": 10, "buffer_size": 16},
        "batch": 32, "steps": 4,
    },
    "B": {
        "image": 256, "levels": 5, "channels": 16,
        "model": {},
        "batch": 1, "steps": 2,
    },
}  # fmt: skip


class RandomImages(torch.utils.data.Dataset):
    """``n`` random images in [-1, 1] with labels ``i % classes``."""

    def __init__(self, n: int, side: int, classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, side, side, generator=g) * 2 - 1
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i % self.classes


def make_latents(root: Path, setup: dict, classes: int, n: int) -> None:
    """A latent cache of ``n`` random images through a small random tokenizer of the setup's shape."""
    levels = setup["levels"]
    tok_cfg = TokenizerConfig(
        resolution=setup["image"], ch=8, ch_mult=(1,) * levels, num_res_blocks=1, decoder_res_blocks=1,
        attn_resolutions=(), z_channels=setup["channels"], embed_dim=setup["channels"], norm_groups=4,
    )  # fmt: skip
    torch.manual_seed(0)
    tokenizer = Tokenizer(tok_cfg, scale=1.0)
    extract_latents(tokenizer, RandomImages(n, setup["image"], classes), root, LatentsConfig(batch_size=8),
                    tokenizer_sha256="random", num_classes=classes, progress=False)  # fmt: skip


def bench(size: str, rows: list[str], work: Path) -> str:
    setup = SETUPS[size]
    classes = setup["model"].get("num_classes", 1000)
    latents = work / f"latents_{size}"
    make_latents(latents, setup, classes, n=setup["batch"] * setup["steps"])
    cfg = TrainConfig(
        batch_size=setup["batch"], epochs=1.0, warmup_epochs=0.0, checkpoint_every=10**6, log_every=1,
        num_workers=0, seed=0, device="cpu",
    )  # fmt: skip
    lines = [
        f"### {size}: batch {setup['batch']}, {setup['steps']} steps (mean after the first)\n",
        "| row | params | s / step | steps / s | tokens / s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        model_cfg = row_model_config(RowConfig(ablation=row, size=size, seed=0), setup["model"])
        result = train(model_cfg, cfg, latents_dir=latents, out_dir=work / f"{size}_{row}", progress=False,
                       resume=False)  # fmt: skip
        timed = result.history[1:] or result.history
        sps = statistics.mean(r["steps_per_s"] for r in timed)
        tps = statistics.mean(r["tokens_per_s"] for r in timed)
        params = result.metrics["params_total"] / 1e6
        lines.append(f"| {row} | {params:.2f}M | {1 / sps:.3f} | {sps:.3f} | {tps:,.0f} |")
        print(lines[-1], flush=True)
    probe = row_model_config(RowConfig(ablation="mar", size=size, seed=0), setup["model"])
    lines.insert(1, f"N = {probe.seq_len} tokens of d = {probe.token_dim}, width {probe.width}.\n")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "B"], choices=list(SETUPS))
    parser.add_argument("--rows", nargs="+", default=list(ABLATION_ROWS), choices=list(ABLATION_ROWS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        body = "\n".join(bench(size, args.rows, Path(tmp)) for size in args.sizes)
    header = (
        f"Machine: {machine()}.\n\nCommand: `{command.strip()}` ({time.perf_counter() - t0:.0f} s).\n\n"
        "Whole engine per step (latent draw, forward, backward, clipping, AdamW, EMA, logging); "
        "tokens/s counts the N tokens of every image of the global batch.\n"
    )
    write_section(args.output, "Training", header + "\n" + body)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
