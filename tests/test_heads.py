"""Both diffusion heads: one shared contract test, plus per-head properties
(official MAR key layout, cached vs uncached keys/values, token independence,
parameter formulas, and a tiny head that overfits a fixed set)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from demar.diffusion import DiffusionConfig
from demar.diffusion_head import DiffusionHead
from demar.mlp_head import MLPHead, MLPHeadConfig
from demar.transformer_head import (
    TransformerHead,
    TransformerHeadConfig,
    attend,
)

D_TOKEN, D_COND, N, M, B = 4, 24, 10, 5, 3
HEADS = ["mlp", "transformer"]


def make_head(kind: str, *, seed: int = 0, perturb: bool = True, **overrides) -> DiffusionHead:
    """A tiny head; ``perturb`` replaces the zero-initialised weights by random ones so
    that outputs depend on every parameter (a zero output layer would hide bugs)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        head = MLPHead(MLPHeadConfig(depth=2, width=32, **overrides), token_dim=D_TOKEN, cond_dim=D_COND)
    else:
        cfg = TransformerHeadConfig(depth=2, width=32, num_heads=4, **overrides)
        head = TransformerHead(cfg, token_dim=D_TOKEN, cond_dim=D_COND)
    if perturb:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return head


def conditions(seed: int = 0, rows: int = B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_all = torch.randn(rows, N, D_COND, generator=g)
    z = z_all[:, 2 : 2 + M]
    target = torch.randn(rows, M, D_TOKEN, generator=g)
    return target, z, z_all


def doubled(z: torch.Tensor, z_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[conditional; null-context] halves: the null half gets different conditions."""
    return torch.cat([z, 0.5 * z + 1]), torch.cat([z_all, 0.5 * z_all + 1])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster and does not fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("kind", HEADS)
def test_head_contract(kind: str, tmp_path) -> None:
    head = make_head(kind)
    target, z, z_all = conditions()

    # Shapes.
    loss = head.loss(target, z, z_all, generator=gen(1))
    assert loss.shape == (B, M) and torch.isfinite(loss).all()
    plain = head.sample(z, z_all, num_steps=8, temperature=1.0, cfg=1.0, generator=gen(2))
    assert plain.shape == (B, M, D_TOKEN) and torch.isfinite(plain).all()
    z2, z_all2 = doubled(z, z_all)
    guided = head.sample(z2, z_all2, num_steps=8, temperature=1.0, cfg=3.0, generator=gen(2))
    assert guided.shape == (B, M, D_TOKEN)
    assert not torch.allclose(guided, plain, atol=1e-4)  # the guidance changes the result

    # Determinism under a seeded generator (and sensitivity to the seed).
    assert torch.equal(loss, head.loss(target, z, z_all, generator=gen(1)))
    assert not torch.equal(loss, head.loss(target, z, z_all, generator=gen(9)))
    assert torch.equal(plain, head.sample(z, z_all, num_steps=8, temperature=1.0, cfg=1.0, generator=gen(2)))
    assert torch.equal(guided, head.sample(z2, z_all2, num_steps=8, temperature=1.0, cfg=3.0, generator=gen(2)))

    # The loss trains every parameter.
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())

    # State-dict round trip through a file: identical outputs from a differently initialised head.
    torch.save(head.state_dict(), tmp_path / "head.pt")
    other = make_head(kind, seed=7)
    assert not torch.equal(other.loss(target, z, z_all, generator=gen(1)), loss)
    other.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    assert torch.equal(other.loss(target, z, z_all, generator=gen(1)), loss)
    assert torch.equal(other.sample(z2, z_all2, num_steps=8, temperature=1.0, cfg=3.0, generator=gen(2)), guided)


@pytest.mark.parametrize("kind", HEADS)
def test_cfg_rows_must_come_in_halves(kind: str) -> None:
    head = make_head(kind)
    _, z, z_all = conditions()
    with pytest.raises(ValueError):
        head.sample(z, z_all, num_steps=4, temperature=1.0, cfg=2.0, generator=gen(0))


@pytest.mark.parametrize("kind", HEADS)
def test_tokens_are_independent(kind: str) -> None:
    """A token's output does not depend on the other tokens being denoised (their
    noisy values, timesteps or own conditions); the transformer head does see z_all.
    In float64, so that equality is exact up to summation order."""
    head = make_head(kind).double()
    target, z, z_all = (x.double() for x in conditions())
    t = torch.randint(0, 1000, (B, M), generator=gen(3))
    out = head(target, t, z, z_all)
    others = torch.ones(M, dtype=torch.bool)
    others[1] = False
    target2, t2, z2 = target.clone(), t.clone(), z.clone()
    target2[:, others] += 3.0
    t2[:, others] = 999 - t2[:, others]
    z2[:, others] *= -1
    out2 = head(target2, t2, z2, z_all)
    torch.testing.assert_close(out2[:, 1], out[:, 1], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out2[:, 0], out[:, 0])
    # A token's output with fewer companions is the same, too.
    alone = head(target[:, 1:2], t[:, 1:2], z[:, 1:2], z_all)
    torch.testing.assert_close(alone[:, 0], out[:, 1], atol=1e-12, rtol=1e-12)
    changed_context = z_all.clone()
    changed_context[:, -1] = torch.randn(B, D_COND, generator=gen(4), dtype=torch.float64)  # not among the M tokens
    changed = head(target, t, z, changed_context)
    if kind == "transformer":
        assert (changed - out).abs().max() > 1e-3
    else:
        assert torch.equal(changed, out)


def test_transformer_cached_and_uncached_keys_values_agree() -> None:
    head = make_head("transformer")
    _, z, z_all = conditions()
    z2, z_all2 = doubled(z, z_all)
    for zz, za, cfg in ((z, z_all, 1.0), (z2, z_all2, 2.5)):
        cached = head.sample(zz, za, num_steps=10, temperature=1.0, cfg=cfg, generator=gen(4), cache_kv=True)
        fresh = head.sample(zz, za, num_steps=10, temperature=1.0, cfg=cfg, generator=gen(4), cache_kv=False)
        torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", HEADS)
def test_compiled_sampling_matches_eager_and_reuses_its_graphs(kind: str) -> None:
    """``compile=True`` draws the same noise and gives the eager result up to rounding; a
    second guidance scale (a linear cfg schedule changes it every step) and a second
    call reuse the compiled code instead of compiling again."""
    torch._dynamo.reset()
    head = make_head(kind)
    _, z, z_all = conditions()
    z2, z_all2 = doubled(z, z_all)
    counters.clear()
    graphs = []
    for cfg in (2.5, 1.5):
        eager = head.sample(z2, z_all2, num_steps=4, temperature=1.0, cfg=cfg, generator=gen(4))
        compiled = head.sample(z2, z_all2, num_steps=4, temperature=1.0, cfg=cfg, generator=gen(4), compile=True)
        # The perturbed heads amplify rounding (outputs reach ~1e3), hence the tolerance.
        torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-2)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == 1  # one step serves the noisy steps and the last, noiseless one
    assert graphs[1] == graphs[0]  # cfg 1.5 compiled nothing new


def test_transformer_head_plain_cpu_attention_matches_the_fused_kernel() -> None:
    g = gen(6)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g) for n in (5, 11, 11))
    torch.testing.assert_close(attend(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=1.0))


def test_transformer_head_modulations_of_all_blocks_equal_each_block_alone() -> None:
    head = make_head("transformer")
    c = torch.randn(B, M, 4 * 32, generator=gen(7))
    for block, together in zip(head.blocks, head.modulations(c), strict=True):
        alpha1, beta1, alpha2, beta2 = (block.scale * c + block.shift).chunk(4, dim=-1)  # method.md, one block
        alone = (alpha1, torch.tanh(beta1), alpha2, torch.tanh(beta2))
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a, b)


def test_transformer_loss_draws_share_keys_values_without_mixing() -> None:
    """The R draws per token sit along the token axis; each draw's loss equals the loss
    computed for that draw alone."""
    head = make_head("transformer", diffusion_batch_mul=3)
    target, z, z_all = conditions()
    loss = head.loss(target, z, z_all, generator=gen(5))
    g = gen(5)  # replay the head's draws: t for [B, R*M], then eps
    t = torch.randint(0, 1000, (B, 3 * M), generator=g)
    noise = torch.randn(B, 3 * M, D_TOKEN, generator=g)
    per_draw = []
    for r in range(3):
        sl = slice(r * M, (r + 1) * M)
        terms = head.train_diffusion.training_losses(
            lambda x_t, tt: head(x_t, tt, z, z_all), target, t[:, sl], noise[:, sl]
        )
        per_draw.append(terms.loss)
    torch.testing.assert_close(loss, torch.stack(per_draw).mean(0), atol=1e-5, rtol=1e-5)


def test_mlp_head_has_the_official_mar_key_layout() -> None:
    """Official ``diffloss.net.<key>`` maps onto ``<head prefix>.<key>`` unchanged."""
    head = MLPHead(MLPHeadConfig(depth=2, width=32), token_dim=D_TOKEN, cond_dim=D_COND)
    expected = ["time_embed.mlp.0", "time_embed.mlp.2", "cond_embed", "input_proj"]
    for i in range(2):
        expected += [
            f"res_blocks.{i}.in_ln",
            f"res_blocks.{i}.mlp.0",
            f"res_blocks.{i}.mlp.2",
            f"res_blocks.{i}.adaLN_modulation.1",
        ]
    expected += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    keys = [f"{name}.{p}" for name in expected for p in ("weight", "bias")]
    assert list(head.state_dict()) == keys
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes["res_blocks.0.adaLN_modulation.1.weight"] == (96, 32)
    assert shapes["final_layer.linear.weight"] == (2 * D_TOKEN, 32)
    assert shapes["cond_embed.weight"] == (32, D_COND)


@pytest.mark.parametrize("kind", HEADS)
def test_zero_initialised_output(kind: str) -> None:
    head = make_head(kind, perturb=False)
    target, z, z_all = conditions()
    out = head(target, torch.zeros(B, M, dtype=torch.long), z, z_all)
    assert torch.all(out == 0)


def test_parameter_counts() -> None:
    # MAR-B's MLP head (6 x 1024, d = 16, D = 768) inside MAR-B (208M in all).
    mar_b = MLPHead(MLPHeadConfig(depth=6, width=1024), token_dim=16, cond_dim=768)
    assert sum(p.numel() for p in mar_b.parameters()) == 35_749_920
    small = MLPHead(
        MLPHeadConfig(depth=1, width=8), token_dim=2, cond_dim=4, diffusion=DiffusionConfig(learn_sigma=False)
    )
    assert small.final_layer.linear.out_features == 2


@pytest.mark.parametrize("kind", HEADS)
def test_grad_checkpointing_changes_nothing(kind: str) -> None:
    plain, ckpt = make_head(kind), make_head(kind)
    ckpt.grad_checkpointing = True  # the switch train.grad_checkpointing sets on every checkpointed module
    target, z, z_all = conditions()
    a = plain.loss(target, z, z_all, generator=gen(6))
    b = ckpt.loss(target, z, z_all, generator=gen(6))
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_transformer_config_checks_heads() -> None:
    with pytest.raises(ValueError):
        TransformerHeadConfig(width=30, num_heads=4)


@pytest.mark.parametrize("kind", HEADS)
def test_tiny_head_overfits_a_fixed_set(kind: str) -> None:
    torch.manual_seed(0)
    head = make_head(kind, perturb=False)
    g = gen(11)
    z_all = torch.randn(4, N, D_COND, generator=g)
    z = z_all[:, :M]
    target = torch.randn(4, M, D_TOKEN, generator=g)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return head.loss(target, z, z_all, generator=gen(12)).mean().item()

    before = eval_loss()
    train_gen = gen(13)
    for _ in range(150):
        opt.zero_grad()
        head.loss(target, z, z_all, generator=train_gen).mean().backward()
        opt.step()
    after = eval_loss()
    assert after < 0.4 * before, (before, after)


def test_timestep_embedder_embeds_each_distinct_step_once_with_the_same_values_and_gradients() -> None:
    from demar.embeddings import TimestepEmbedder

    torch.manual_seed(0)
    embedder = TimestepEmbedder(32)
    t = torch.randint(0, 20, (6, 40), generator=gen(1))  # 240 draws of 20 values
    grad_out = torch.randn(6, 40, 32, generator=gen(2))
    deduplicated = embedder(t)
    (deduplicated * grad_out).sum().backward()
    grads = [p.grad.clone() for p in embedder.parameters()]
    embedder.zero_grad()
    plain = embedder._embed(t)  # every draw through the MLP
    (plain * grad_out).sum().backward()
    torch.testing.assert_close(deduplicated, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (p.grad for p in embedder.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert embedder(torch.tensor([[7]])).shape == (1, 1, 32)  # one step broadcast over rows (sampling)


@pytest.mark.parametrize("kind", HEADS)
def test_loss_projects_each_condition_once_and_repeats_it_for_the_draws(kind: str) -> None:
    head = make_head(kind, diffusion_batch_mul=3)
    target, z, z_all = conditions()
    projected = []
    handle = head.cond_embed.register_forward_hook(lambda _m, inputs, _o: projected.append(inputs[0].shape))
    got = head.loss(target, z, z_all, generator=gen(4))
    handle.remove()
    assert projected == [torch.Size([B, M, D_COND])], "z projected once, not once per draw"
    # The same draws with the conditions repeated before the projection (the unshared computation).
    cond = head.prepare(z.repeat(1, 3, 1), z_all, cache_kv=True)
    terms = head.train_diffusion.training_losses(
        lambda x_t, t: head.denoise(x_t, t, cond), target.repeat(1, 3, 1), generator=gen(4)
    )
    torch.testing.assert_close(got, terms.loss.view(B, 3, M).mean(dim=1), rtol=1e-5, atol=1e-6)
