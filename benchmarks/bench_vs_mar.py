"""Our MAR row against the official MAR code (LTH14/mar), side by side at equal settings.

Both models are built at the same configuration and hold the same weights (ours
copied into the official layout with :func:`demar.mar_checkpoint.to_official`).
In one process, the two take turns on:

- the training step: forward, backward, gradient clipping, AdamW and the EMA
  update, as each code base's training loop runs them (the official one as
  ``engine_mar.py`` does: per-parameter EMA loop; both AdamW with two weight-decay
  groups and the same learning rate and betas);
- sampling, seconds per image at equal autoregressive steps, diffusion steps and
  guidance.

Each timing is the median of its rounds; the two sides alternate within a round
so that a change in the machine's load hits both. The ratio is official time /
ours (above 1: ours is faster). The achieved FLOP/s of our step (FLOPs from
``torch.utils.flop_counter``) is set against this machine's fp32 matrix-multiply
peak, measured in the same run at the same thread count.

The official code is imported from a checkout the user points at, never copied
here; it needs ``timm`` (``pip install timm``). The calls with which it moves tensors
and modules to the GPU are made no-ops for the run, so it runs on the CPU.

Run: ``python benchmarks/bench_vs_mar.py --mar-repo PATH [--configs tiny B] [--threads 2] [--write]``
(``--write`` replaces the "Against official MAR" section of ``BENCHMARKS.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import machine, write_section

from demar.ema import EMA
from demar.mar_checkpoint import to_official
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig
from demar.params import load_params
from demar.sampler import SampleSettings
from demar.train import param_groups

ROOT = Path(__file__).resolve().parents[1]
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, EMA_RATE = 3e-3, (0.9, 0.95), 0.05, 3.0, 0.99


@dataclass(frozen=True)
class Setup:
    """One compared configuration.

    Attributes:
        model: our MAR row's config (the official model is built from it).
        batch: training batch.
        train_rounds: timed training rounds (one step of each side per round).
        sample: the sampling knobs both sides use.
        sample_batch: images per sampling call.
        sample_rounds: timed sampling rounds.
    """

    model: ModelConfig
    batch: int
    train_rounds: int
    sample: SampleSettings
    sample_batch: int
    sample_rounds: int


def setups() -> dict[str, Setup]:
    """``tiny``: the embedded preset's MAR row and sampler; ``B``: MAR-B (ImageNet 256 shapes), batch 8.

    At B a CPU step takes tens of seconds, so the rounds are few and sampling runs 4
    autoregressive and 10 diffusion steps (MAR samples with 64 / 100; both sides run the same).
    """
    embedded = load_params(ROOT / "presets" / "embedded.yaml")
    sampler = embedded.sample_config("mar").sampler
    return {
        "tiny": Setup(
            model=embedded.row_model("mar"), batch=embedded.train.batch_size, train_rounds=15,
            sample=sampler,
            sample_batch=50, sample_rounds=3,
        ),
        "B": Setup(
            model=ModelConfig.from_size("B", **ABLATION_ROWS["mar"]), batch=8, train_rounds=2,
            sample=SampleSettings(num_iter=4, diffusion_steps=10, cfg=4.0, cfg_schedule="linear"),
            sample_batch=1, sample_rounds=2,
        ),
    }  # fmt: skip


# ---------------------------------------------------------------- the official code


@contextlib.contextmanager
def official_on_cpu(repo: Path) -> Iterator[None]:
    """Import path of the official checkout, its moves to the GPU (``Tensor.cuda``, ``Module.cuda``) no-ops while inside."""
    tensor_cuda, module_cuda = torch.Tensor.cuda, nn.Module.cuda
    sys.path.insert(0, str(repo))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = tensor_cuda, module_cuda  # type: ignore[method-assign]
        sys.path.remove(str(repo))


def build_official(repo: Path, cfg: ModelConfig, diffusion_steps: int) -> nn.Module:
    """The official ``MAR`` at ``cfg`` (its sampler respaced to ``diffusion_steps``)."""
    if not (repo / "models" / "mar.py").is_file():
        raise SystemExit(f"--mar-repo {repo}: no models/mar.py there (expected a checkout of LTH14/mar)")
    try:
        from models.mar import MAR  # the official checkout, put on the path by official_on_cpu
    except ImportError as err:
        raise SystemExit(f"--mar-repo {repo}: cannot import the official code ({err}); it needs timm") from err
    side = int(round(cfg.seq_len**0.5))
    if side * side != cfg.seq_len:
        raise SystemExit(f"seq_len {cfg.seq_len} is not a square; the official MAR needs a square token grid")
    masking = cfg.masking
    if masking.distribution != "truncnorm" or (masking.mask_ratio_mu, masking.mask_ratio_std) != (1.0, 0.25):
        raise SystemExit(f"the official MAR only has its truncated normal masking; got {masking}")
    return MAR(
        img_size=side * cfg.patch_size, vae_stride=1, patch_size=cfg.patch_size,
        encoder_embed_dim=cfg.width, encoder_depth=cfg.encoder_depth, encoder_num_heads=cfg.num_heads,
        decoder_embed_dim=cfg.width, decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        vae_embed_dim=cfg.latent_channels, mask_ratio_min=masking.mask_ratio_min,
        label_drop_prob=cfg.label_drop_prob, class_num=cfg.num_classes,
        attn_dropout=cfg.attn_dropout, proj_dropout=cfg.proj_dropout, buffer_size=cfg.buffer_size,
        diffloss_d=cfg.mlp_head.depth, diffloss_w=cfg.mlp_head.width,
        num_sampling_steps=str(diffusion_steps), diffusion_batch_mul=cfg.mlp_head.diffusion_batch_mul,
    )  # fmt: skip


def official_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The official training's AdamW groups: no weight decay on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": WEIGHT_DECAY}]


# ---------------------------------------------------------------- the two steps


def our_step(
    model: DeMAR,
    batch: int,
    seed: int,
    *,
    lr: float = LR,
    betas: tuple[float, float] = BETAS,
    weight_decay: float = WEIGHT_DECAY,
    grad_clip: float = GRAD_CLIP,
    ema_rate: float = EMA_RATE,
    fused: bool = False,
) -> Callable[[], None]:
    """One step of our engine's order on a fixed random batch: forward, backward, clip, AdamW, EMA."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, cfg.seq_len, cfg.token_dim, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)
    ema = EMA(model, ema_rate)

    def step() -> None:
        out = model(tokens, labels, generator=g)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

    return step


def official_step(model: nn.Module, cfg: ModelConfig, batch: int, seed: int) -> Callable[[], None]:
    """One step of ``engine_mar.py``'s order on the same shapes: forward, backward, clip, AdamW, EMA loop."""
    g = torch.Generator().manual_seed(seed)
    side = int(round(cfg.seq_len**0.5)) * cfg.patch_size
    latents = torch.randn(batch, cfg.latent_channels, side, side, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    optimizer = torch.optim.AdamW(official_param_groups(model), lr=LR, betas=BETAS)
    params = list(model.parameters())
    ema_params = [p.detach().clone() for p in params]

    def step() -> None:
        loss = model(latents, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        for target, source in zip(ema_params, params, strict=True):
            target.mul_(EMA_RATE).add_(source.detach(), alpha=1 - EMA_RATE)

    return step


def step_flop_counts(model: DeMAR, batch: int) -> dict[str, int]:
    """FLOPs of one forward + backward of our model by op (``"aten.mm"``, ...); the optimizer's work is left out."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, cfg.seq_len, cfg.token_dim, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens, labels, generator=g).loss.backward()
    model.zero_grad(set_to_none=True)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def step_flops(model: DeMAR, batch: int) -> int:
    """FLOPs of one forward + backward of our model (the optimizer's elementwise work left out)."""
    return sum(step_flop_counts(model, batch).values())


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matrix-multiply FLOP/s at the current thread count (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def alternate(first: Callable[[], None], second: Callable[[], None], rounds: int) -> tuple[float, float]:
    """Median seconds of each callable over ``rounds`` rounds, the order flipping every round."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        order = ((0, first), (1, second)) if r % 2 == 0 else ((1, second), (0, first))
        for i, fn in order:
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


# ---------------------------------------------------------------- one configuration


def compare(name: str, setup: Setup, repo: Path) -> dict[str, Any]:
    """Training step and sampling, ours vs official, at one configuration."""
    cfg = setup.model
    torch.manual_seed(0)
    ours = DeMAR(cfg)
    with official_on_cpu(repo):
        official = build_official(repo, cfg, setup.sample.diffusion_steps)
        official.load_state_dict(to_official(ours.state_dict()), strict=True)
        params = sum(p.numel() for p in ours.parameters())
        print(f"[{name}] {params / 1e6:.2f}M parameters, batch {setup.batch}", flush=True)

        ours.train(), official.train()
        step_ours, step_official = our_step(ours, setup.batch, 0), official_step(official, cfg, setup.batch, 0)
        step_ours(), step_official()  # warm-up: allocator, optimizer state
        t_ours, t_official = alternate(step_ours, step_official, setup.train_rounds)
        print(f"[{name}] training step: ours {t_ours:.3f} s, official {t_official:.3f} s", flush=True)
        flops = step_flops(ours, setup.batch)

        ours.eval(), official.eval()
        s = setup.sample
        n = setup.sample_batch
        labels = torch.arange(n) % cfg.num_classes
        g = torch.Generator().manual_seed(0)

        @torch.no_grad()
        def sample_ours() -> None:
            ours.sample(labels, s, generator=g)

        @torch.no_grad()
        def sample_official() -> None:
            official.sample_tokens(n, num_iter=s.num_iter, cfg=s.cfg, cfg_schedule=s.cfg_schedule, labels=labels,
                                   temperature=s.temperature)  # fmt: skip

        sample_ours(), sample_official()
        u_ours, u_official = alternate(sample_ours, sample_official, setup.sample_rounds)
        print(f"[{name}] sampling: ours {u_ours / n:.4f} s/image, official {u_official / n:.4f} s/image", flush=True)
    return {
        "name": name, "cfg": cfg, "params": params, "batch": setup.batch, "rounds": setup.train_rounds,
        "step_ours": t_ours, "step_official": t_official, "flops": flops,
        "sample": s, "sample_batch": n, "sample_rounds": setup.sample_rounds,
        "image_ours": u_ours / n, "image_official": u_official / n,
    }  # fmt: skip


def report(results: list[dict[str, Any]], peak: float, command: str, seconds: float) -> str:
    """The Markdown section: settings, training-step table, sampling table."""
    lines = [
        f"Machine: {machine()}. Measured fp32 matrix-multiply peak (2048 x 2048, same threads): "
        f"{peak / 1e9:.0f} GFLOP/s.",
        "",
        f"Command: `{command}` ({seconds:.0f} s), with `PATH` a checkout of github.com/LTH14/mar "
        "(commit fe470ac) and timm installed.",
        "",
        "Same configuration and the same weights on both sides; ratio = official time / ours (above 1: "
        "ours is faster). Training step = forward, backward, clipping, AdamW, EMA; median of the rounds, "
        "the two sides taking turns. Achieved = our step's forward and backward FLOPs / our step time.",
        "",
        "| config | params | batch | ours s / step | official s / step | ratio | our GFLOP / step "
        "| achieved GFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        achieved = r["flops"] / r["step_ours"]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['step_ours']:.3f} | "
            f"{r['step_official']:.3f} | {r['step_official'] / r['step_ours']:.2f}x | {r['flops'] / 1e9:.2f} | "
            f"{achieved / 1e9:.1f} | {achieved / peak:.0%} |"
        )
    lines += [
        "",
        "Sampling, seconds per image (median of the rounds, the sides taking turns):",
        "",
        "| config | images per call | AR steps | diffusion steps | cfg | ours s / image | official s / image "
        "| ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["sample"]
        lines.append(
            f"| {r['name']} | {r['sample_batch']} | {s.num_iter} | {s.diffusion_steps} | {s.cfg:g} "
            f"({s.cfg_schedule}) | {r['image_ours']:.4f} | {r['image_official']:.4f} | "
            f"{r['image_official'] / r['image_ours']:.2f}x |"
        )
    lines += ["", "Configs: " + "; ".join(describe(r) for r in results) + "."]
    return "\n".join(lines) + "\n"


def describe(r: dict[str, Any]) -> str:
    """One configuration in words."""
    c: ModelConfig = r["cfg"]
    return (
        f"{r['name']}: width {c.width}, {c.encoder_depth}+{c.decoder_depth} blocks, N = {c.seq_len} tokens of "
        f"d = {c.token_dim}, buffer {c.buffer_size}, MLP head {c.mlp_head.depth} x {c.mlp_head.width}, "
        f"{c.mlp_head.diffusion_batch_mul} diffusion draws per token, dropout {c.attn_dropout:g}/{c.proj_dropout:g}, "
        f"{r['rounds']} training rounds"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mar-repo", type=Path, required=True, help="a checkout of github.com/LTH14/mar")
    parser.add_argument("--configs", nargs="+", default=["tiny", "B"], choices=["tiny", "B"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    all_setups = setups()
    results = [compare(name, all_setups[name], args.mar_repo.resolve()) for name in args.configs]
    command = "python benchmarks/bench_vs_mar.py --mar-repo PATH " + " ".join(
        (["--configs", *args.configs] if args.configs != ["tiny", "B"] else [])
        + ([f"--threads {args.threads}"] if args.threads else [])
        + (["--write"] if args.write else [])
    )
    body = report(results, peak, command.strip(), time.perf_counter() - start)
    print(body)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", "Against official MAR", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
