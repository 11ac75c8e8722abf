"""DeMAR: losses of the four ablation rows, noise injection, patchify, checkpoints, configs."""

from __future__ import annotations

import pytest
import torch

from demar.config import ConfigError
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig, load_model, patchify, save_checkpoint, unpatchify

N, D_TOK = 16, 4


def tiny(row: str = "mar", **overrides) -> ModelConfig:
    return ModelConfig.from_size(
        "tiny", token_dim=D_TOK, seq_len=N, num_classes=10, buffer_size=4, **ABLATION_ROWS[row], **overrides
    )


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_from_size_merges_nested_overrides_and_rejects_unknown_keys():
    cfg = ModelConfig.from_size("tiny", diffusion_head="transformer", noise_injection={"max_step": 7})
    assert cfg.width == 96 and cfg.transformer_head.width == 96 and cfg.transformer_head.depth == 2
    assert cfg.noise_injection.max_step == 7 and cfg.noise_injection.distribution == "uniform"
    assert ModelConfig.from_size("tiny", transformer_head={"depth": 3}).transformer_head.width == 96
    with pytest.raises(ConfigError, match="widht"):
        ModelConfig.from_size("tiny", widht=3)
    with pytest.raises(ConfigError, match="max_step"):
        ModelConfig.from_size("tiny", noise_injection={"max_step": 1000})
    sec = ModelConfig.from_section({"size": "small", "seq_len": 64}, source="params.yaml")
    assert sec.width == 160 and sec.seq_len == 64
    with pytest.raises(ConfigError, match="params.yaml"):
        ModelConfig.from_section({"size": "tiny", "bogus": 1}, source="params.yaml")


@pytest.mark.parametrize("row", list(ABLATION_ROWS))
def test_loss_parts_per_row(row):
    cfg = tiny(row, lambda_refine=2.0, lambda_assess=0.5, masking={"mask_ratio_max": 0.9})
    model = DeMAR(cfg)
    out = model(torch.randn(3, N, D_TOK), torch.tensor([0, 1, 2]), gen())
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if cfg.denoising_head:
        assert out.refinement > 0 and out.assessment > 0 and counts["denoising_head"] > 0
    else:
        assert out.refinement == 0 and out.assessment == 0 and counts["denoising_head"] == 0
    torch.testing.assert_close(out.loss, out.diffusion + 2.0 * out.refinement + 0.5 * out.assessment)
    head = type(model.diffusion_head).__name__
    assert head == ("MLPHead" if cfg.diffusion_head == "mlp" else "TransformerHead")


def test_diffusion_loss_is_the_mean_over_masked_tokens():
    model = DeMAR(tiny("mar")).eval()
    x, y = torch.randn(2, N, D_TOK), torch.tensor([4, 5])
    out = model(x, y, gen(3))
    # the same draws by hand: masking, then the head's per-token loss on the masked tokens
    g = gen(3)
    orders, mask, m = model.backbone.sample_training_mask(2, g, x.device)
    z = model.backbone(x, mask, y, generator=g)
    idx = orders[:, :m]
    pick = lambda t: torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    per_token = model.diffusion_head.loss(pick(x), pick(z), z, generator=g)
    assert per_token.shape == (2, m)
    torch.testing.assert_close(out.diffusion, per_token.mean())


def test_noise_injection_only_in_denoising_rows():
    seen = {}

    def grab(name):
        return lambda module, args, kwargs: seen.__setitem__(name, (args[0].clone(), args[1].clone()))

    x = torch.randn(2, N, D_TOK)
    for row in ("mar", "de_head"):
        model = DeMAR(tiny(row, noise_injection={"max_step": 500}, masking={"mask_ratio_max": 0.9}))
        handle = model.backbone.register_forward_pre_hook(grab(row), with_kwargs=True)
        model(x, torch.tensor([0, 1]), gen(1))
        handle.remove()
    tokens_mar, _ = seen["mar"]
    tokens_de, mask_de = seen["de_head"]
    assert torch.equal(tokens_mar, x)
    unmasked = ~mask_de
    assert unmasked.any()
    assert not torch.allclose(tokens_de[unmasked], x[unmasked])  # noisy inputs
    torch.testing.assert_close(tokens_de[mask_de], x[mask_de])  # masked ones untouched (and ignored)


def test_all_masked_batch_gives_zero_denoising_losses():
    model = DeMAR(tiny("demar", masking={"mask_ratio_min": 1.0}))
    out = model(torch.randn(2, N, D_TOK), torch.tensor([0, 1]), gen())
    assert out.refinement == 0 and out.assessment == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    # every parameter is in the graph (DistributedDataParallel requires it), with a zero gradient here
    assert all(p.grad is not None for p in model.denoising_head.parameters())


@pytest.mark.parametrize("p", [1, 2])
def test_patchify_round_trip_and_layout(p):
    lat = torch.randn(2, 3, 8, 4)
    tok = patchify(lat, p)
    assert tok.shape == (2, (8 // p) * (4 // p), 3 * p * p)
    torch.testing.assert_close(unpatchify(tok, p, 3, grid=(8 // p, 4 // p)), lat)
    if p == 2:  # token 1 = patch (row 0, col 1): channel first, then patch row, then patch column
        expected = lat[0, :, 0:2, 2:4].reshape(-1)
        torch.testing.assert_close(tok[0, 1], expected)
    sq = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(unpatchify(patchify(sq, p), p, 2), sq)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DeMAR(tiny("demar"))
    ema = DeMAR(tiny("demar"))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, ema_state=ema, extra={"step": 12})
    raw = torch.load(path, weights_only=True)
    assert raw["extra"] == {"step": 12} and raw["config"] == model.cfg.model_dump()

    loaded = load_model(path, use_ema=False)
    assert loaded.cfg == model.cfg and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, y = torch.randn(2, N, D_TOK), torch.tensor([1, 2])
    model.eval()
    assert torch.equal(model(x, y, gen(2)).loss, loaded(x, y, gen(2)).loss)
    loaded_ema = load_model(path)  # EMA by default
    assert torch.equal(loaded_ema.backbone.z_proj.weight, ema.backbone.z_proj.weight)

    save_checkpoint(tmp_path / "no_ema.pt", model)
    assert torch.equal(load_model(tmp_path / "no_ema.pt").backbone.z_proj.weight, model.backbone.z_proj.weight)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt"):
        load_model(tmp_path / "foreign.pt")


def test_text_context_model_trains():
    model = DeMAR(tiny("demar", context="text", text_dim=6, label_drop_prob=0.0, masking={"mask_ratio_max": 0.9}))
    out = model(torch.randn(2, N, D_TOK), torch.randn(2, 3, 6), gen())
    out.loss.backward()
    assert model.backbone.context_proj.weight.grad.abs().sum() > 0


@pytest.mark.slow  # about 5-7 s per row on two shared cores
@pytest.mark.parametrize("row", list(ABLATION_ROWS))
def test_each_row_overfits_a_fixed_batch(row):
    # A fixed batch: the same tokens, labels and the same draws (mask, noise, t, eps) every step.
    torch.manual_seed(0)
    cfg = tiny(
        row,
        attn_dropout=0.0,
        proj_dropout=0.0,
        label_drop_prob=0.0,
        masking={"mask_ratio_max": 0.9},  # keep unmasked tokens for the denoising head
        diffusion={"learn_sigma": False},
    )
    model = DeMAR(cfg)
    x, y = torch.randn(4, N, D_TOK), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = last = None
    for step in range(80):
        out = model(x, y, gen(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.loss.item() if step == 0 else first
        last = out.loss.item()
    assert last < first / 10, (row, first, last)
