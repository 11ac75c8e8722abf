"""Sampling loop: per-step counts, guidance, determinism, refinement."""

from __future__ import annotations

import pytest
import torch

from demar.model import ABLATION_ROWS, DeMAR, ModelConfig
from demar.sampler import SampleSettings, cfg_at_step, masked_after_step, sample_tokens

N, D_TOK = 16, 4


def make_model(row: str = "mar", **overrides) -> DeMAR:
    cfg = ModelConfig.from_size(
        "tiny", token_dim=D_TOK, seq_len=N, num_classes=10, buffer_size=4, **ABLATION_ROWS[row], **overrides
    )
    torch.manual_seed(0)
    model = DeMAR(cfg)
    # Untrained heads output zeros (adaLN-Zero); give every output layer weights so samples depend on z.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "final_layer" in name or "adaLN_modulation" in name or "refine_out" in name:
                p.normal_(0, 0.1)
    return model.eval()


def settings(**kw) -> SampleSettings:
    return SampleSettings(**{"num_iter": 4, "diffusion_steps": 4, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_counts_golden():
    # N = 16, K = 4: floor(16 cos(pi/8)) = 14, floor(16 cos(pi/4)) = 11, floor(16 cos(3pi/8)) = 6, then 0.
    masked, counts = N, []
    for k in range(4):
        nxt = masked_after_step(k, 4, N, masked)
        counts.append(masked - nxt)
        masked = nxt
    assert counts == [2, 3, 5, 6]
    # MAR's linear CFG: 1 + (cfg - 1)(N - mask_len)/N
    assert cfg_at_step(SampleSettings(cfg=3.0), 12, 16) == pytest.approx(1.5)
    assert cfg_at_step(SampleSettings(cfg=3.0, cfg_schedule="constant"), 12, 16) == 3.0


@pytest.mark.parametrize("row", ["mar", "demar"])
@pytest.mark.parametrize("num_iter", [1, 4, 24])
def test_per_step_counts_follow_cosine_schedule_and_leave_none_masked(row, num_iter):
    model = make_model(row)
    seen: list[tuple[int, int]] = []
    result = sample_tokens(
        model,
        torch.tensor([1, 2]),
        settings(num_iter=num_iter, diffusion_steps=3),
        gen(),
        step_callback=lambda k, m: seen.append((k, m)),
    )
    expected, masked = [], N
    for k in range(num_iter):
        nxt = masked_after_step(k, num_iter, N, masked)
        expected.append(masked - nxt)
        masked = nxt
    assert result.tokens_per_step == expected == [m for _, m in seen]
    assert sum(expected) == N
    if num_iter == 24:  # more steps than tokens: MAR's clamp keeps one masked, some steps predict nothing
        assert 0 in expected and expected[-1] >= 1
    assert result.tokens.shape == (2, N, D_TOK)
    assert torch.all(result.tokens != 0), "a position was never predicted"


def test_same_seed_same_samples():
    model = make_model("demar")
    s = settings(cfg=2.0, temperature=0.9)
    a = model.sample(torch.tensor([3, 4]), s, gen(11))
    b = model.sample(torch.tensor([3, 4]), s, gen(11))
    c = model.sample(torch.tensor([3, 4]), s, gen(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_one_is_the_unguided_path():
    model = make_model("demar")
    labels = torch.tensor([5, 6])
    base = model.sample(labels, settings(cfg=1.0), gen(3))
    guided = model.sample(labels, settings(cfg=3.0), gen(3))
    with torch.no_grad():  # the null context only matters under guidance
        model.backbone.fake_latent.add_(1.0)
    assert torch.equal(model.sample(labels, settings(cfg=1.0), gen(3)), base)
    assert not torch.allclose(model.sample(labels, settings(cfg=3.0), gen(3)), guided)
    assert not torch.allclose(guided, base)


def test_guided_batch_rows_are_independent_of_batch_mates():
    # each image's guided sample depends on its own label only (null rows paired correctly)
    model = make_model("demar")
    s = settings(cfg=2.5, temperature=0.0)  # temperature 0: no per-step noise, fixed orders below
    g = gen(0)
    pair = model.sample(torch.tensor([1, 7]), s, g)
    assert pair.shape == (2, N, D_TOK)
    assert not torch.allclose(pair[0], pair[1])


def test_refinement_and_final_refinement_change_tokens():
    mar_like = make_model("diff_head")
    demar = make_model("demar")
    # same backbone and diffusion head weights: only the denoising head differs
    demar.load_state_dict(mar_like.state_dict(), strict=False)
    labels = torch.tensor([2, 3])
    plain = mar_like.sample(labels, settings(), gen(4))
    refined = demar.sample(labels, settings(), gen(4))
    final = demar.sample(labels, settings(final_refinement=True), gen(4))
    assert not torch.allclose(plain, refined)
    assert not torch.allclose(refined, final)
    # first step's tokens are the same (nothing to refine yet) only when K = 1
    one_plain = mar_like.sample(labels, settings(num_iter=1), gen(4))
    one_refined = demar.sample(labels, settings(num_iter=1), gen(4))
    assert torch.equal(one_plain, one_refined)


def test_text_context_unconditional_and_mode_restored():
    model = make_model("demar", context="text", text_dim=6).train()
    text = torch.randn(2, 3, 6)
    out = model.sample(text, settings(cfg=2.0), gen())
    assert out.shape == (2, N, D_TOK)
    assert model.training  # restored after sampling
    unc = model.sample(None, settings(), gen(), num_images=3)
    assert unc.shape == (3, N, D_TOK)
    with pytest.raises(ValueError, match="num_images"):
        model.sample(None, settings(), gen())


def test_cache_kv_does_not_change_samples():
    model = make_model("diff_head")
    labels = torch.tensor([0, 9])
    a = model.sample(labels, settings(cache_kv=True, cfg=1.5), gen(8))
    b = model.sample(labels, settings(cache_kv=False, cfg=1.5), gen(8))
    torch.testing.assert_close(a, b)
