"""Text encoders: a tiny CLIP written here, the packaged MiniLM offline, null context, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from demar.config import ConfigError, validate
from demar.text_encoders import TextEncoderConfig, build_text_encoder, minilm_folder
from tiny_text import write_tiny_clip

_NETWORK_BLOCKED = False


def _block_sockets(event: str, args: tuple) -> None:
    if _NETWORK_BLOCKED and event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        raise OSError(f"network use during an offline test: {event} {args[1:] if len(args) > 1 else args}")


sys.addaudithook(_block_sockets)  # audit hooks cannot be removed: it acts only while the flag is set


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return build_text_encoder(TextEncoderConfig(kind="clip", path=str(clip_dir)))


def test_clip_gives_77_token_states(clip):
    states, mask = clip.encode(["a red circle", "red", "circle " * 90])
    assert states.shape == (3, 77, 32) and states.dtype == torch.float32
    assert mask.shape == (3, 77) and mask.dtype == torch.bool
    # start, a, red, circle, end: 5 real tokens; a long caption is truncated to 77 (end token kept)
    assert mask.sum(1).tolist() == [5, 3, 77]
    ids = clip.tokenizer("circle " * 90, truncation=True, max_length=77)["input_ids"]
    assert ids[-1] == clip.tokenizer.eos_token_id
    assert torch.isfinite(states).all()
    # final layer norm applied: every token state is normalised before the affine (weight 1, bias 0 at init)
    assert states.mean(-1).abs().max() < 1e-4
    assert (states.std(-1, unbiased=False) - 1).abs().max() < 1e-2


def test_clip_real_tokens_ignore_padding_and_batch(clip):
    batch, _ = clip.encode(["a red circle", "circle " * 90])
    alone, _ = clip.encode(["a red circle"])
    torch.testing.assert_close(batch[0, :5], alone[0, :5], rtol=1e-5, atol=1e-5)
    again, _ = clip.encode(["a red circle"])
    assert torch.equal(alone, again)  # frozen, eval mode: deterministic


def test_empty_caption_is_the_null_context(clip):
    null_states, null_mask = clip.null()
    states, mask = clip.encode(["a red circle", ""])
    assert null_states.shape == (77, 32) and null_mask.sum().item() == 2  # start and end tokens
    torch.testing.assert_close(states[1], null_states, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask[1], null_mask)
    assert not torch.allclose(states[0], null_states)


def test_encoder_is_frozen(clip):
    clip.train()
    assert not clip.model.training
    assert all(not p.requires_grad for p in clip.parameters())


def test_identity_names_the_weights(clip, clip_dir, tmp_path):
    ident = clip.identity()
    assert ident["kind"] == "clip" and ident["width"] == 32 and ident["max_length"] == 77
    other = build_text_encoder(TextEncoderConfig(kind="clip", path=str(write_tiny_clip(tmp_path / "c2", seed=1))))
    assert other.identity()["weights_sha256"] != ident["weights_sha256"]
    assert other.identity()["tokenizer_sha256"] == ident["tokenizer_sha256"]
    short = build_text_encoder(TextEncoderConfig(kind="clip", path=str(clip_dir), max_length=16))
    assert short.encode(["a red circle"])[0].shape == (1, 16, 32)
    assert short.identity()["max_length"] == 16
    # causal attention: the real tokens' states do not depend on how far the caption is padded
    torch.testing.assert_close(short.encode(["a red circle"])[0][0, :5], clip.encode(["a red circle"])[0][0, :5])


def test_missing_folder_names_path_and_key(tmp_path):
    missing = tmp_path / "no_clip_here"
    with pytest.raises(ConfigError) as err:
        build_text_encoder(TextEncoderConfig(kind="clip", path=str(missing)), key="captions.encoder")
    assert "captions.encoder.path" in str(err.value) and str(missing) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"captions\.encoder\.path: .*empty is not a model folder"):
        build_text_encoder(TextEncoderConfig(kind="clip", path=str(tmp_path / "empty")), key="captions.encoder")


def test_config_errors(clip_dir):
    with pytest.raises(ConfigError, match="needs path"):
        validate(TextEncoderConfig, {"kind": "clip"}, prefix="captions.encoder")
    with pytest.raises(ConfigError, match="not both"):
        validate(TextEncoderConfig, {"kind": "clip", "path": "a", "name": "b"})
    with pytest.raises(ConfigError, match="unknown key"):
        validate(TextEncoderConfig, {"kind": "minilm", "size": 3})
    with pytest.raises(ConfigError, match=r"text_encoder\.max_length: 100 exceeds the 77 positions"):
        build_text_encoder(TextEncoderConfig(kind="clip", path=str(clip_dir), max_length=100))


def test_minilm_loads_offline_from_the_package(monkeypatch, tmp_path):
    """The embedded default's encoder: weights inside the installed package, no network, no hub cache."""
    global _NETWORK_BLOCKED
    folder = minilm_folder()
    assert (folder / "model.safetensors").stat().st_size > 80_000_000  # the real weights, not a pointer file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    _NETWORK_BLOCKED = True
    try:
        enc = build_text_encoder(TextEncoderConfig(kind="minilm", max_length=16))
        captions = ["a red circle", "a small red ring", "the stock market fell sharply today", ""]
        states, mask = enc.encode(captions)
        null_states, null_mask = enc.null()
    finally:
        _NETWORK_BLOCKED = False
    assert states.shape == (4, 16, 384) and enc.width == 384
    assert mask.sum(1).tolist() == [5, 6, 8, 2]  # [CLS] words [SEP]
    torch.testing.assert_close(states[3], null_states, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask[3], null_mask)
    # trained weights: mean-pooled sentence embeddings place the two shapes together, far from the news
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    near, far = (pooled[0] @ pooled[1]).item(), (pooled[0] @ pooled[2]).item()
    assert near > 0.5 > far, (near, far)
