"""Golden numbers: a training loss, a sampling loop and a few engine steps of each ablation row.

Each row's tiny seeded model is pinned to numbers recorded from the code as it stood
when these tests were written (sums and a few values, as diffusers' scheduler tests
do), so that a refactor that changes results fails here, loudly, instead of silently
moving Table 4. The tolerances are float rounding on the CPU (single thread): a change
of summation order passes, a change of any draw or formula does not.

If a change of the numbers is intended, say why in the commit and re-record them
with ``python tests/test_golden.py`` (prints the dictionaries below).
"""

from __future__ import annotations

import importlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from demar.model import DeMAR, ModelConfig, load_model
from demar.sampler import SampleSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import write_latents  # noqa: E402  (the documented latent-cache layout)

ROWS: dict[str, dict[str, Any]] = {
    "mar": {"diffusion_head": "mlp", "denoising_head": False},
    "diff_head": {"diffusion_head": "transformer", "denoising_head": False},
    "de_head": {"diffusion_head": "mlp", "denoising_head": True},
    "demar": {"diffusion_head": "transformer", "denoising_head": True},
}
"""Table 4's switches, written out so that the numbers below stay tied to them."""

RTOL, ATOL = 1e-5, 1e-6


def _public(name: str, *modules: str) -> Any:
    """``name`` from the first of ``modules`` that defines it (the layout is being reshaped)."""
    for module in modules:
        try:
            value = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if value is not None:
            return value
    raise ImportError(f"none of {modules} defines {name}")


def tiny_config(row: str) -> ModelConfig:
    """The tests' tiny model: 16 tokens of d = 4, 10 classes; noise injection up to step 300."""
    return ModelConfig.from_size(
        "tiny",
        token_dim=4,
        seq_len=16,
        num_classes=10,
        buffer_size=4,
        noise_injection={"max_step": 300},
        **ROWS[row],
    )


def _sum(tensors: list[torch.Tensor]) -> tuple[float, float]:
    """(sum, sum of absolute values) in float64, so that the summary adds no rounding of its own."""
    total = sum(float(t.double().sum()) for t in tensors)
    absolute = sum(float(t.double().abs().sum()) for t in tensors)
    return total, absolute


def _model(row: str) -> DeMAR:
    """The seeded initial weights, each moved by seeded noise: the heads' zero-initialised
    output layers would otherwise hide them from the loss and the samples."""
    torch.manual_seed(1234)  # initial weights
    model = DeMAR(tiny_config(row))
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def loss_numbers(row: str) -> dict[str, float]:
    """One training forward/backward on a fixed batch: the losses and the gradients' sums."""
    model = _model(row).train()
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(4, 16, 4, generator=g)  # [B, N, d]
    labels = torch.tensor([0, 3, 6, 9])
    torch.manual_seed(99)  # dropout draws from the global RNG
    out = model(tokens, labels, generator=torch.Generator().manual_seed(11))
    out.loss.backward()
    grad_sum, grad_abs = _sum([p.grad for p in model.parameters() if p.grad is not None])
    return {
        "loss": out.loss.item(),
        "diffusion": out.diffusion.item(),
        "refinement": out.refinement.item(),
        "assessment": out.assessment.item(),
        "grad_sum": grad_sum,
        "grad_abs_sum": grad_abs,
    }


def sample_settings(row: str) -> SampleSettings:
    """A short loop with every knob away from its neutral value (final refinement on De. Head rows)."""
    return SampleSettings(
        num_iter=4,
        diffusion_steps=5,
        cfg=2.5,
        temperature=0.9,
        final_refinement=ROWS[row]["denoising_head"],
    )


def sample_numbers(row: str) -> dict[str, Any]:
    """A full guided sampling loop with a seeded generator: sums and a few token values."""
    model = _model(row).eval()
    labels = torch.tensor([1, 5, 7])
    tokens = model.sample(labels, sample_settings(row), generator=torch.Generator().manual_seed(21))
    assert tokens.shape == (3, 16, 4)
    total, absolute = _sum([tokens])
    flat = tokens.flatten()
    return {"sum": total, "abs_sum": absolute, "values": [float(flat[i]) for i in (0, 17, 63, 100, 191)]}


def engine_numbers(row: str, root: Path) -> dict[str, Any]:
    """Four optimizer steps of the training engine (two slices each) on a tiny latent cache."""
    train = _public("train", "demar.train", "demar.engine", "demar.training")
    train_config = _public("TrainConfig", "demar.params", "demar.train", "demar.engine", "demar.training")
    latents = write_latents(root / "latents", n=16, channels=4, side=4, classes=4)
    cfg = ModelConfig.from_size(
        "tiny", token_dim=4, seq_len=16, num_classes=4, buffer_size=4, noise_injection={"max_step": 300}, **ROWS[row]
    )
    train_cfg = train_config(
        batch_size=8,
        micro_batches=2,
        base_lr=4e-3,
        epochs=2.0,  # 16 images / batch 8 = 4 steps
        warmup_epochs=0.25,  # the first step has a learning rate of 0
        ema_rate=0.9,
        checkpoint_every=100,
        log_every=1,
        num_workers=0,
        seed=5,
        device="cpu",
    )
    result = train(cfg, train_cfg, latents_dir=latents, out_dir=root / "run", progress=False)
    weights, weights_abs = _sum(list(load_model(result.model_path, use_ema=False).state_dict().values()))
    ema, _ = _sum(list(load_model(result.model_path, use_ema=True).state_dict().values()))
    return {
        "losses": [float(r["loss"]) for r in result.history],
        "weights_sum": weights,
        "weights_abs_sum": weights_abs,
        "ema_sum": ema,
    }


# ---------------------------------------------------------------------- recorded numbers

LOSS: dict[str, dict[str, float]] = {
    "mar": {
        "loss": 1.4661991596221924,
        "diffusion": 1.4661991596221924,
        "refinement": 0.0,
        "assessment": 0.0,
        "grad_sum": 10.310210076834148,
        "grad_abs_sum": 2862.1755199048202,
    },
    "diff_head": {
        "loss": 1.327720046043396,
        "diffusion": 1.327720046043396,
        "refinement": 0.0,
        "assessment": 0.0,
        "grad_sum": -13.287630769029231,
        "grad_abs_sum": 1641.5514049388191,
    },
    "de_head": {
        "loss": 5.730705261230469,
        "diffusion": 1.4630793333053589,
        "refinement": 0.9241719841957092,
        "assessment": 3.343454122543335,
        "grad_sum": -70.17609887396998,
        "grad_abs_sum": 11992.760278397636,
    },
    "demar": {
        "loss": 2.958221912384033,
        "diffusion": 1.2135510444641113,
        "refinement": 0.6730492115020752,
        "assessment": 1.0716216564178467,
        "grad_sum": -33.29460483563908,
        "grad_abs_sum": 6788.909225199635,
    },
}
SAMPLE: dict[str, dict[str, Any]] = {
    "mar": {
        "sum": -320663.7641878128,
        "abs_sum": 3973631.274874687,
        "values": [-15711.125, 11845.1103515625, 21188.390625, 26947.365234375, -18597.443359375],
    },
    "diff_head": {
        "sum": 1390722.4968528748,
        "abs_sum": 4172826.7266578674,
        "values": [19004.9375, -43708.61328125, 10206.4580078125, 51433.96484375, -10016.1923828125],
    },
    "de_head": {
        "sum": -318435.916015625,
        "abs_sum": 4006369.6389160156,
        "values": [-15817.5888671875, 15336.77734375, 20232.2890625, 26661.689453125, -18303.7421875],
    },
    "demar": {
        "sum": 1485355.4800872803,
        "abs_sum": 4149023.588180542,
        "values": [19004.955078125, -42955.546875, 10609.337890625, 51726.0703125, -10016.1923828125],
    },
}
ENGINE: dict[str, dict[str, Any]] = {
    "mar": {
        "losses": [1.0038137435913086, 1.005525827407837, 1.030114769935608, 4.671459674835205],
        "weights_sum": 1335.1956538243728,
        "weights_abs_sum": 35744.31126204491,
        "ema_sum": 1334.3070233515086,
    },
    "diff_head": {
        "losses": [1.0038137435913086, 1.005525827407837, 1.0322482585906982, 4.6959991455078125],
        "weights_sum": 2255.9413814049267,
        "weights_abs_sum": 44537.481891112235,
        "ema_sum": 2255.8680088308083,
    },
    "de_head": {
        "losses": [2.791403293609619, 4.638885498046875, 3.8331127166748047, 6.038698673248291],
        "weights_sum": 1324.100437214609,
        "weights_abs_sum": 37467.78667570833,
        "ema_sum": 1322.990678505416,
    },
    "demar": {
        "losses": [2.7706422805786133, 4.71864128112793, 4.364530086517334, 6.017136573791504],
        "weights_sum": 2276.6254533740703,
        "weights_abs_sum": 46266.99048595949,
        "ema_sum": 2276.2971258168964,
    },
}


def _close(actual: Any, expected: Any, what: str) -> None:
    if isinstance(expected, list):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _close(a, e, f"{what}[{i}]")
        return
    assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL), f"{what}: {actual!r} != recorded {expected!r}"


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded CPU kernels: the recorded numbers were taken that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("row", list(ROWS))
def test_training_loss_and_gradients(row):
    got = loss_numbers(row)
    for key, expected in LOSS[row].items():
        _close(got[key], expected, f"{row} {key}")
    if not ROWS[row]["denoising_head"]:
        assert got["refinement"] == got["assessment"] == 0.0


@pytest.mark.parametrize("row", list(ROWS))
def test_sampling_loop(row):
    got = sample_numbers(row)
    for key, expected in SAMPLE[row].items():
        _close(got[key], expected, f"{row} {key}")


@pytest.mark.parametrize("row", list(ROWS))
def test_engine_steps(row, tmp_path):
    got = engine_numbers(row, tmp_path)
    for key, expected in ENGINE[row].items():
        _close(got[key], expected, f"{row} {key}")


if __name__ == "__main__":  # re-record: python tests/test_golden.py
    import pprint

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        recorded = {
            "LOSS": {row: loss_numbers(row) for row in ROWS},
            "SAMPLE": {row: sample_numbers(row) for row in ROWS},
            "ENGINE": {row: engine_numbers(row, Path(tmp) / row) for row in ROWS},
        }
    for name, table in recorded.items():
        print(f"{name} = ", end="")
        pprint.pprint(table, width=110, sort_dicts=False)
