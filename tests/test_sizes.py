"""Size registry: parameter counts against the paper, tiny vs small, and `demar params`."""

from __future__ import annotations

import pytest

from demar.cli import main
from demar.model import ABLATION_ROWS, ModelConfig, count_params
from demar.sizes import PAPER_PARAMS_M, SIZES, get_size


@pytest.mark.parametrize("size", ["B", "L", "H"])
def test_mar_and_demar_counts_match_paper(size):
    # ImageNet 256: N = 256 tokens of d = 16, 1000 classes (the ModelConfig defaults).
    mar = count_params(ModelConfig.from_size(size, **ABLATION_ROWS["mar"]))
    demar = count_params(ModelConfig.from_size(size, **ABLATION_ROWS["demar"]))
    paper = PAPER_PARAMS_M[size]
    assert abs(mar["total"] / 1e6 - paper["mar"]) / paper["mar"] < 0.01
    assert abs(demar["total"] / 1e6 - paper["demar"]) / paper["demar"] < 0.03
    assert mar["denoising_head"] == 0 and demar["denoising_head"] > 0
    assert mar["backbone"] == demar["backbone"]
    assert demar["total"] == demar["backbone"] + demar["diffusion_head"] + demar["denoising_head"]


def test_size_architecture_matches_table1():
    for name, (width, blocks, heads, tdepth) in {
        "B": (768, 24, 12, 4),
        "L": (1024, 32, 16, 6),
        "H": (1280, 40, 16, 9),
    }.items():
        cfg = ModelConfig.from_size(name)
        assert (cfg.width, cfg.encoder_depth + cfg.decoder_depth, cfg.num_heads) == (width, blocks, heads)
        assert cfg.transformer_head.depth == tdepth
        assert cfg.width * cfg.mlp_ratio == 4 * width


def test_small_is_three_to_four_times_tiny():
    kw = {"token_dim": 8, "seq_len": 64, "num_classes": 10}
    for row in ("mar", "demar"):
        tiny = count_params(ModelConfig.from_size("tiny", **kw, **ABLATION_ROWS[row]))["total"]
        small = count_params(ModelConfig.from_size("small", **kw, **ABLATION_ROWS[row]))["total"]
        assert 3.0 <= small / tiny <= 4.0, (row, small / tiny)


def test_unknown_size():
    with pytest.raises(KeyError, match="known sizes"):
        get_size("XL")


def test_demar_params_lists_every_size(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for size in SIZES:
        rows = [line for line in lines if line.split()[:1] == [size]]
        assert {r.split()[1] for r in rows} == {"mar", "demar"}, size
    b_mar = next(line for line in lines if line.split()[:2] == ["B", "mar"]).split()
    assert b_mar[5] == "207.92" and b_mar[6] == "208"
