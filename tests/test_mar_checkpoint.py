"""Official MAR (LTH14/mar) checkpoint layout <-> our MAR row."""

from __future__ import annotations

import argparse

import pytest
import torch

from demar.mar_checkpoint import from_official, infer_config, load_official, to_official
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig


def tiny_mar() -> ModelConfig:
    return ModelConfig.from_size("tiny", token_dim=4, seq_len=16, num_classes=10, buffer_size=4)


def official_file(path, model: DeMAR, ema: DeMAR | None = None) -> None:
    ema = ema or model
    torch.save(
        {
            "model": to_official(model.state_dict()),
            "model_ema": to_official(ema.state_dict()),
            "epoch": 799,
            "args": argparse.Namespace(model="mar_tiny", diffloss_d=2),
        },
        path,
    )


def test_official_layout_loads_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = DeMAR(tiny_mar()).eval()
    ema = DeMAR(tiny_mar()).eval()
    path = tmp_path / "checkpoint-last.pth"
    official_file(path, model, ema)

    loaded = load_official(path, tiny_mar(), use_ema=False)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, y = torch.randn(3, 16, 4), torch.tensor([1, 2, 3])
    out_a = model(x, y, torch.Generator().manual_seed(5))
    out_b = loaded(x, y, torch.Generator().manual_seed(5))
    assert torch.equal(out_a.loss, out_b.loss)

    # default: EMA weights, config inferred from the shapes
    loaded_ema = load_official(path)
    assert loaded_ema.cfg == tiny_mar()
    assert torch.equal(loaded_ema.backbone.class_emb.weight, ema.backbone.class_emb.weight)


def test_official_key_names():
    with torch.device("meta"):
        model = DeMAR(ModelConfig.from_size("B"))
    keys = set(to_official(model.state_dict()))
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    expected = {
        "class_emb.weight",
        "fake_latent",
        "mask_token",
        "encoder_pos_embed_learned",
        "decoder_pos_embed_learned",
        "diffusion_pos_embed_learned",
    }
    for m in ["z_proj", "z_proj_ln", "encoder_norm", "decoder_embed", "decoder_norm"]:
        expected |= {f"{m}.weight", f"{m}.bias"}
    for part in ("encoder_blocks", "decoder_blocks"):
        for i in range(12):
            expected |= {f"{part}.{i}.{m}.{wb}" for m in block for wb in ("weight", "bias")}
    net = "diffloss.net."
    for m in ["time_embed.mlp.0", "time_embed.mlp.2", "cond_embed", "input_proj", "final_layer.linear",
              "final_layer.adaLN_modulation.1"]:  # fmt: skip
        expected |= {f"{net}{m}.weight", f"{net}{m}.bias"}
    for j in range(6):
        for m in ["in_ln", "mlp.0", "mlp.2", "adaLN_modulation.1"]:
            expected |= {f"{net}res_blocks.{j}.{m}.weight", f"{net}res_blocks.{j}.{m}.bias"}
    assert keys == expected
    shapes = {k: tuple(v.shape) for k, v in to_official(model.state_dict()).items()}
    assert shapes["class_emb.weight"] == (1000, 768)
    assert shapes["encoder_pos_embed_learned"] == (1, 64 + 256, 768)
    assert shapes["diffloss.net.final_layer.linear.weight"] == (32, 1024)
    assert set(from_official(to_official(model.state_dict()))) == set(model.state_dict())


def test_mismatched_state_dict_gives_clear_error(tmp_path):
    model = DeMAR(tiny_mar())
    state = to_official(model.state_dict())
    del state["encoder_norm.weight"]
    state["encoder_blocks.0.attn.q_norm.weight"] = torch.ones(24)
    state["diffloss.net.cond_embed.weight"] = torch.zeros(128, 7)
    path = tmp_path / "bad.pth"
    torch.save({"model": state, "model_ema": state}, path)
    with pytest.raises(ValueError) as err:
        load_official(path, tiny_mar())
    msg = str(err.value)
    assert "bad.pth" in msg
    assert "missing (1)" in msg and "backbone.encoder_norm.weight" in msg
    assert "unexpected (1)" in msg and "backbone.encoder_blocks.0.attn.q_norm.weight" in msg
    assert "mis-shaped (1)" in msg and "diffusion_head.cond_embed.weight: file (128, 7) vs model (128, 96)" in msg


def test_missing_ema_entry_and_wrong_row(tmp_path):
    model = DeMAR(tiny_mar())
    path = tmp_path / "no_ema.pth"
    torch.save({"model": to_official(model.state_dict()), "model_ema": None}, path)
    with pytest.raises(ValueError, match="no_ema.pth.*'model_ema'"):
        load_official(path)
    assert isinstance(load_official(path, use_ema=False), DeMAR)
    with pytest.raises(ValueError, match="MAR row only"):
        load_official(path, tiny_mar().model_copy(update=ABLATION_ROWS["demar"]), use_ema=False)
    demar = DeMAR(tiny_mar().model_copy(update={"denoising_head": True}))
    with pytest.raises(ValueError, match="official MAR layout"):
        to_official(demar.state_dict())


def test_infer_config_needs_heads_for_unregistered_width():
    model = DeMAR(tiny_mar().model_copy(update={"width": 40, "num_heads": 5}))
    state = to_official(model.state_dict())
    with pytest.raises(ValueError, match="num_heads"):
        infer_config(state)
    assert infer_config(state, num_heads=5).width == 40
