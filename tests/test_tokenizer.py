from __future__ import annotations

import pytest
import torch
from shared_configs import TINY_TOKENIZER

from demar.config import ConfigError, validate
from demar.data.embedded import EmbeddedConfig, generate
from demar.tokenizer import (
    AutoencoderKL,
    CheckpointError,
    DiagonalGaussian,
    Tokenizer,
    TokenizerConfig,
    load_kl16,
)
from demar.tokenizer_train import (
    TokenizerTrainConfig,
    latent_scale,
    reconstruction_psnr,
    to_unit,
    train_tokenizer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions gain nothing from a second thread, and on a busy machine two threads
    # can be many times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes():
    images, _, _ = generate(EmbeddedConfig(num_train=64, num_reference=16), "train", progress=False)
    return images


def test_kl16_layout_and_size():
    cfg = TokenizerConfig()  # the defaults are MAR's KL-16
    assert cfg.latent_shape() == (16, 16, 16)
    sd = AutoencoderKL(cfg).state_dict()
    # LDM's key layout: attention in the encoder's lowest level and middle, none in the decoder's levels.
    for key, shape in {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in sd)
    assert "encoder.down.4.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd

    def blocks(prefix):
        return {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}

    assert blocks("decoder.up.0.block.") == {"0", "1", "2"} and blocks("encoder.down.0.block.") == {"0", "1"}
    assert sum(v.numel() for v in sd.values()) == 66_456_019  # about 254 MiB in fp32, as the official file


@pytest.mark.slow
def test_kl16_loads_from_official_layout(tmp_path):
    cfg = TokenizerConfig()
    source = AutoencoderKL(cfg)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)  # training-time keys are ignored
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, path)
    tok = load_kl16(path, cfg, scale=0.2325)
    assert tok.scale == 0.2325 and tok.meta["ignored_keys"] == 1
    for k, v in source.state_dict().items():
        assert torch.equal(tok.model.state_dict()[k], v), k
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        moments = tok.encode_moments(x)
        assert moments.shape == (1, 32, 16, 16)
        tokens = DiagonalGaussian(moments).mode() * tok.scale  # what tok.encode(x, sample=False) gives
        out = tok.decode(tokens)
    assert tokens.shape == (1, 16, 16, 16) and out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    other = TokenizerConfig(**{**TINY_TOKENIZER.model_dump(), "embed_dim": 2})
    sd = AutoencoderKL(other).state_dict()
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.ckpt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_kl16(path, TINY_TOKENIZER, scale=1.0)
    msg = str(err.value)
    assert str(path) in msg
    assert "1 missing key(s)" in msg and "decoder.conv_out.bias" in msg
    assert "1 unexpected key(s)" in msg and "encoder.extra.weight" in msg
    assert "mis-shaped" in msg and "quant_conv.weight: checkpoint (4, 8, 1, 1) vs model (8, 8, 1, 1)" in msg

    torch.save(sd, tmp_path / "flat.ckpt")  # a bare state dict, not {"model": ...}
    with pytest.raises(CheckpointError, match=r"flat\.ckpt: expected a dict with a 'model' state dict"):
        load_kl16(tmp_path / "flat.ckpt", TINY_TOKENIZER, scale=1.0)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_kl16(tmp_path / "nowhere.ckpt", TINY_TOKENIZER, scale=1.0)


def test_bundle_round_trip(tmp_path):
    tok = Tokenizer(TINY_TOKENIZER, scale=0.7, meta={"source": "test"})
    tok.save(tmp_path / "tok.pt")
    back = Tokenizer.load(tmp_path / "tok.pt")
    assert back.scale == 0.7 and back.config == TINY_TOKENIZER and back.meta == {"source": "test"}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok.eval().encode_moments(x), back.encode_moments(x))
        z = back.encode(x, sample=False)
        assert z.shape == (2, 4, 8, 8)
        assert torch.allclose(back.decode(z), back.model.decode(z / 0.7))
    with pytest.raises(ValueError, match="positive"):
        Tokenizer(TINY_TOKENIZER, scale=0.0)


def test_config_validation():
    with pytest.raises(ConfigError, match="divisible by norm_groups"):
        validate(TokenizerConfig, {"ch": 24, "norm_groups": 32}, prefix="tokenizer.architecture")
    with pytest.raises(ConfigError, match="unknown key"):
        validate(TokenizerConfig, {"channels": 3}, prefix="tokenizer.architecture")


def test_posterior_clamp_sample_kl():
    moments = torch.cat([torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 50.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.max() == 20.0
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(post.sample(g1), post.sample(g2))
    unit = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert torch.equal(unit.kl(), torch.zeros(1, 4, 2, 2))


def test_training_resumes_exactly(shapes, tmp_path):
    cfg = TokenizerTrainConfig(steps=6, batch_size=8, warmup_steps=2, log_every=1, checkpoint_every=3)
    straight = train_tokenizer(TINY_TOKENIZER, cfg, shapes, progress=False)
    ckpt = tmp_path / "resume.pt"
    with pytest.raises(_Stop):  # killed during step 4, after the checkpoint of step 3
        train_tokenizer(TINY_TOKENIZER, cfg, shapes, checkpoint=ckpt, fingerprint="d", progress=False, on_log=_stop_at(4))
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    resumed = train_tokenizer(TINY_TOKENIZER, cfg, shapes, checkpoint=ckpt, fingerprint="d", progress=False)
    assert resumed.resumed_from == 3 and resumed.history == straight.history
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # A checkpoint made for other data (or another config) is not resumed.
    assert train_tokenizer(TINY_TOKENIZER, cfg, shapes, checkpoint=ckpt, fingerprint="other", progress=False).resumed_from == 0


def test_training_learns_scale_and_psnr(shapes):
    cfg = TokenizerTrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_every=5)
    result = train_tokenizer(TINY_TOKENIZER, cfg, shapes, progress=False)
    assert result.history[-1]["recon"] < 0.5 * result.history[0]["recon"]
    scale = latent_scale(result.model, shapes, batch_size=32, seed=1)
    with torch.no_grad():
        z = DiagonalGaussian(result.model.encode_moments(to_unit(shapes))).sample(torch.Generator().manual_seed(2))
    assert abs((z * scale).std().item() - 1.0) < 0.05
    tok = Tokenizer(TINY_TOKENIZER, scale, model=result.model)
    p = reconstruction_psnr(tok, shapes[:16], batch_size=8)
    assert p["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(255.0**2 / p["mse"])).item(), rel=1e-6)
    assert 10 < p["psnr"] < 40 and p["psnr_image_mean"] >= p["psnr"] - 1e-6  # Jensen: mean of logs >= log of mean


class _Stop(Exception):
    pass


def _stop_at(step):
    def hook(row):
        if row["step"] == step:
            raise _Stop

    return hook
