"""Mechanism diagnostics: no gain from an untrained head, a gain after training, calibration, the refine knob."""

from __future__ import annotations

import math

import pytest
import torch

from demar.diagnostics import assessment_calibration, denoising_by_level, masked_loss_by_visible
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig
from demar.sampler import SampleSettings

LEVELS = (0, 100, 200, 400)


def tiny(ablation: str) -> DeMAR:
    torch.manual_seed(0)
    cfg = ModelConfig.from_size(
        "micro", token_dim=4, seq_len=16, buffer_size=4, num_classes=4, **ABLATION_ROWS[ablation],
        attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0, diffusion={"learn_sigma": False},
        noise_injection={"max_step": 400},  # a wide range of noise, so that the true similarities vary
    )  # fmt: skip
    return DeMAR(cfg)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 16, 4, generator=g), torch.arange(16) % 4


def trained(ablation: str, steps: int = 200) -> DeMAR:
    """A tiny model fitted to the fixed batch (the denoising head learns to pull x~ towards x)."""
    model = tiny(ablation)
    x, labels = batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        loss = model(x, labels, g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_an_untrained_head_does_not_denoise():
    x, labels = batch()
    for level in denoising_by_level(tiny("demar"), x, labels, LEVELS, generator=torch.Generator().manual_seed(0)):
        assert level.refined == level.input and level.fused == pytest.approx(level.input, rel=1e-6)
        assert level.gain == pytest.approx(0.0, abs=1e-6 * level.input)
    assert [lv.input for lv in denoising_by_level(tiny("demar"), x, labels, LEVELS)] == sorted(
        lv.input for lv in denoising_by_level(tiny("demar"), x, labels, LEVELS)
    )  # more noise, larger input error


def test_a_head_trained_on_a_fixed_batch_denoises_where_it_was_trained():
    x, labels = batch()
    model = trained("demar")
    levels = denoising_by_level(model, x, labels, LEVELS, generator=torch.Generator().manual_seed(0))
    at = {lv.level: lv for lv in levels}
    for s in (200, 400):
        assert at[s].refined < at[s].input and at[s].gain > 0, at[s]
    assert model.training  # the diagnostics leave the mode as they found it


def test_calibration_reports_correlations_and_a_reliability_table():
    x, labels = batch()
    result = assessment_calibration(trained("demar"), x, labels, LEVELS, bins=5)
    assert set(result) == {"pearson_x", "pearson_y", "pearson", "mean_abs_error", "bins"}
    assert sum(b["count"] for b in result["bins"]) == 2 * len(LEVELS) * 16 * 8  # two scores per visible token
    preds = [b["predicted"] for b in result["bins"]]
    assert preds == sorted(preds)
    untrained = assessment_calibration(tiny("demar"), x, labels, LEVELS, bins=5)
    assert result["mean_abs_error"] < untrained["mean_abs_error"] / 2, (result, untrained)  # eq. 6 was trained
    assert all(math.isfinite(result[k]) for k in ("pearson_x", "pearson_y", "pearson"))
    with pytest.raises(ValueError, match="no denoising head"):
        assessment_calibration(tiny("mar"), x, labels, LEVELS)


@pytest.mark.parametrize("ablation", ["mar", "demar"])
def test_masked_loss_by_visible_is_seeded_and_finite(ablation):
    x, labels = batch()
    model = trained(ablation, steps=40)
    first = masked_loss_by_visible(model, x, labels, seed=3, diffusion_steps=10)
    assert first == masked_loss_by_visible(model, x, labels, seed=3, diffusion_steps=10)
    assert set(first) == {"ground_truth", "noisy", "own_samples"} and all(math.isfinite(v) for v in first.values())
    assert first["noisy"] != first["ground_truth"] != first["own_samples"]


def test_the_refine_knob_changes_de_head_samples_and_leaves_mar_samples_alone():
    labels = torch.arange(4)

    def draw(model: DeMAR, refine: bool) -> torch.Tensor:
        settings = SampleSettings(num_iter=4, diffusion_steps=5, cfg=2.0, refine=refine)
        return model.sample(labels, settings, torch.Generator().manual_seed(0))

    demar = trained("demar", steps=40)
    assert not torch.equal(draw(demar, True), draw(demar, False))
    mar = trained("mar", steps=40)
    assert torch.equal(draw(mar, True), draw(mar, False))


def test_report_shows_the_diagnostics_of_the_rows_that_have_them(tmp_path):
    from test_reports import build, make_tree

    from demar.io import write_json

    make_tree(tmp_path, seeds=(0,))
    x, labels = batch()
    model = tiny("demar")
    levels = denoising_by_level(model, x, labels, LEVELS)
    records = {
        "demar_tiny_s0": {
            "row": "demar_tiny_s0", "ablation": "demar", "size": "tiny", "seed": 0, "num_tokens_images": 16,
            "masked_loss": masked_loss_by_visible(model, x, labels, diffusion_steps=5),
            "levels": [lv.as_dict() for lv in levels],
            "calibration": assessment_calibration(model, x, labels, LEVELS, bins=4),
            "refine_off": {"num_images": 20, "fid": 99.5, "class_accuracy": 0.25},
        },
        "mar_tiny_s0": {
            "row": "mar_tiny_s0", "ablation": "mar", "size": "tiny", "seed": 0, "num_tokens_images": 16,
            "masked_loss": masked_loss_by_visible(tiny("mar"), x, labels, diffusion_steps=5),
            "levels": None, "calibration": None, "refine_off": None,
        },
    }  # fmt: skip
    for name, record in records.items():
        write_json(tmp_path / "metrics" / "diagnostics" / f"{name}.json", record)
    result = build(tmp_path)
    table = result.tables["diagnostics"].numeric
    assert sorted(table["Row"]) == ["demar_tiny_s0", "mar_tiny_s0"]  # the rows with diagnostics only
    demar = table.set_index("Row").loc["demar_tiny_s0"]
    assert demar["FID (refine off)"] == 99.5 and demar["Gain at s=100"] == pytest.approx(0.0, abs=1e-5)
    assert demar["Loss, own samples"] == records["demar_tiny_s0"]["masked_loss"]["own_samples"]
    for stem in ("fig_diag_levels", "fig_diag_calibration", "fig_diag_masked_loss"):
        assert (tmp_path / "out" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "out" / "index.html").read_text()
    assert "Diagnostics of the denoising head" in html and "Assessment calibration" in html
    md = (tmp_path / "out" / "diagnostics.md").read_text()
    mar_line = next(line for line in md.splitlines() if line.startswith("| mar_tiny_s0 "))
    assert "nan" not in md and "|  |" in mar_line  # MAR has no refinement: blank cells, not NaN
