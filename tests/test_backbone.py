"""MAR backbone: masking distribution and counts, determinism, context handling, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from demar.backbone import MARBackbone, MaskingConfig, draw_mask_ratio, mask_from_orders, random_orders

N, D_TOK, WIDTH = 16, 4, 32


def make_backbone(**overrides) -> MARBackbone:
    kwargs = {
        "token_dim": D_TOK,
        "seq_len": N,
        "width": WIDTH,
        "encoder_depth": 1,
        "decoder_depth": 1,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "attn_dropout": 0.0,
        "proj_dropout": 0.0,
        "buffer_size": 4,
        "context": "class",
        "num_classes": 10,
        "text_dim": 12,
        "label_drop_prob": 0.1,
        "masking": MaskingConfig(),
    }
    kwargs.update(overrides)
    return MARBackbone(**kwargs)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_truncnorm_ratio_support_and_mean():
    cfg = MaskingConfig()
    g = gen(0)
    draws = torch.tensor([draw_mask_ratio(cfg, g) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    # N(1, 0.25^2) truncated to [0.7, 1]: mean 1 + 0.25 (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)) = 0.8670
    assert abs(draws.mean().item() - 0.8670) < 0.006


def test_beta_ratio_mean():
    cfg = MaskingConfig(distribution="beta", beta_a=3.0, beta_b=1.0, mask_ratio_min=1e-6)
    g = gen(1)
    draws = torch.tensor([draw_mask_ratio(cfg, g) for _ in range(4000)])
    assert draws.min() >= 1e-6 and draws.max() <= 1.0
    assert abs(draws.mean().item() - 0.75) < 0.01  # Beta(3, 1) mean a / (a + b)


def test_mask_count_is_ceil_r_n_and_follows_order():
    bb = make_backbone(seq_len=50)
    for seed in range(5):
        r = draw_mask_ratio(bb.masking, gen(seed))
        orders, mask, num_masked = bb.sample_training_mask(3, gen(seed), torch.device("cpu"))
        assert num_masked == math.ceil(r * 50)
        assert mask.sum(dim=1).tolist() == [num_masked] * 3
        # masked positions are exactly the first num_masked entries of each order
        for i in range(3):
            assert set(orders[i, :num_masked].tolist()) == set(mask[i].nonzero().flatten().tolist())
        assert all(sorted(o.tolist()) == list(range(50)) for o in orders)


def test_masking_is_deterministic_per_seed():
    bb = make_backbone()
    a = bb.sample_training_mask(4, gen(7), torch.device("cpu"))
    b = bb.sample_training_mask(4, gen(7), torch.device("cpu"))
    c = bb.sample_training_mask(4, gen(8), torch.device("cpu"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_forward_shape_determinism_and_masked_inputs_ignored():
    bb = make_backbone().eval()
    x = torch.randn(2, N, D_TOK)
    mask = mask_from_orders(random_orders(2, N, gen(0), torch.device("cpu")), 10)
    labels = torch.tensor([1, 2])
    z1 = bb(x, mask, labels)
    assert z1.shape == (2, N, WIDTH)
    z2 = bb(x, mask, labels)
    assert torch.equal(z1, z2)
    # values at masked positions never reach the network
    x_other = torch.where(mask.unsqueeze(-1), torch.randn_like(x), x)
    torch.testing.assert_close(bb(x_other, mask, labels), z1)
    # ... whereas unmasked values do
    x_changed = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x))
    assert not torch.allclose(bb(x_changed, mask, labels), z1)


def test_unequal_mask_counts_rejected():
    bb = make_backbone()
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="same number"):
        bb(torch.randn(2, N, D_TOK), mask, torch.tensor([0, 1]))


def test_label_drop_uses_null_context_and_generator():
    bb = make_backbone(label_drop_prob=1.0)
    x = torch.randn(3, N, D_TOK)
    mask = mask_from_orders(random_orders(3, N, gen(0), torch.device("cpu")), 8)
    labels = torch.tensor([0, 1, 2])
    bb.train()
    dropped = bb(x, mask, labels, generator=gen(0))
    bb.eval()
    null = bb(x, mask, None)
    forced = bb(x, mask, labels, drop_context=torch.tensor([True, True, True]))
    cond = bb(x, mask, labels)
    torch.testing.assert_close(dropped, null)
    torch.testing.assert_close(forced, null)
    assert not torch.allclose(cond, null)
    # probability 0.5: the generator decides which rows drop, reproducibly
    bb = make_backbone(label_drop_prob=0.5).train()
    buf1 = bb.embed_context(torch.arange(8), 8, generator=gen(3))
    buf2 = bb.embed_context(torch.arange(8), 8, generator=gen(3))
    assert torch.equal(buf1, buf2)
    is_null = (buf1 == bb.fake_latent).all(dim=-1).all(dim=-1)
    assert 0 < int(is_null.sum()) < 8


def test_text_context_fills_first_slots():
    bb = make_backbone(context="text", buffer_size=6).eval()
    text = torch.randn(2, 3, 12)
    buf = bb.embed_context(text, 2)
    assert buf.shape == (2, 6, WIDTH)
    torch.testing.assert_close(buf[:, :3], bb.context_proj(text))
    torch.testing.assert_close(buf[:, 3:], bb.fake_latent.expand(2, 3, -1))
    z = bb(torch.randn(2, N, D_TOK), torch.zeros(2, N, dtype=torch.bool), text)
    assert z.shape == (2, N, WIDTH)
    with pytest.raises(ValueError, match="exceeds buffer_size"):
        bb.embed_context(torch.randn(2, 7, 12), 2)
    assert not hasattr(bb, "class_emb")


def test_init_matches_mar():
    bb = make_backbone(width=64, num_heads=4)
    assert torch.all(bb.z_proj.bias == 0) and torch.all(bb.encoder_blocks[0].attn.qkv.bias == 0)
    bound = math.sqrt(6 / (64 + 3 * 64))  # xavier-uniform of qkv [3D, D]
    assert bb.encoder_blocks[0].attn.qkv.weight.abs().max() <= bound
    assert abs(bb.encoder_pos_embed_learned.std().item() - 0.02) < 0.003
    assert torch.all(bb.encoder_norm.weight == 1)


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randn(2, N, D_TOK)
    mask = mask_from_orders(random_orders(2, N, gen(0), torch.device("cpu")), 12)
    labels = torch.tensor([3, 4])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        bb = make_backbone(grad_checkpointing=ckpt, label_drop_prob=0.0).train()
        bb(x, mask, labels).square().mean().backward()
        grads.append(bb.encoder_blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_official_parameter_names():
    names = set(dict(make_backbone().named_parameters()))
    for key in (
        "class_emb.weight",
        "fake_latent",
        "z_proj.weight",
        "z_proj_ln.weight",
        "encoder_pos_embed_learned",
        "encoder_blocks.0.norm1.weight",
        "encoder_blocks.0.attn.qkv.bias",
        "encoder_blocks.0.attn.proj.weight",
        "encoder_blocks.0.mlp.fc1.weight",
        "encoder_blocks.0.mlp.fc2.bias",
        "encoder_norm.bias",
        "decoder_embed.weight",
        "mask_token",
        "decoder_pos_embed_learned",
        "decoder_blocks.0.norm2.weight",
        "decoder_norm.weight",
        "diffusion_pos_embed_learned",
    ):
        assert key in names, key
