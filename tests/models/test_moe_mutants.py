"""MoE behaviour the MoE tests left unpinned (found by mutation testing): the layer against
transformers' Qwen3-MoE sparse block (its router included, not our `route`), the balance loss's
gradient against transformers', empty masks, config refusals, the `auto` matmul choice, the
expert load bookkeeping and the experts' init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm1.config import ConfigError, DecoderConfig, load_config
from mm1.models.moe import MoE, MoEConfig, balance_loss, route, z_loss

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: E402


def _layer(seed: int = 0, expert_dim: int = 0, **moe) -> MoE:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=64, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=48)
    cfg.ffn = MoEConfig(**{"experts": 4, "top_k": 2, "expert_dim": expert_dim, **moe})
    layer = MoE(cfg, cfg.ffn)
    layer.gate.weight.data.normal_(0, 0.5)
    layer.experts.init_parameters(0.1)
    return layer.eval()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("expert_dim", [0, 16])
@pytest.mark.parametrize("matmul", ["grouped", "loop"])
def test_the_layer_equals_transformers_qwen3_moe_block(norm: bool, expert_dim: int, matmul: str):
    layer = _layer(expert_dim=expert_dim, norm_topk_prob=norm, expert_matmul=matmul)
    hf_cfg = transformers.Qwen3MoeConfig(
        hidden_size=32,
        moe_intermediate_size=expert_dim or 48,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=norm,
    )
    hf_cfg._experts_implementation = "eager"
    block = modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg).eval()
    block.load_state_dict(layer.state_dict())  # the same names and layouts
    assert layer.experts.gate_up_proj.shape == (4, 2 * (expert_dim or 48), 32)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = layer(x)
        theirs = block(x)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_route_weights_are_the_softmax_probabilities_of_the_top_k() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0], [-3.0, -2.0, -1.0, -4.0]])
    probs = logits.softmax(-1)
    r = route(logits, 2, normalise=False)
    assert r.experts.tolist() == [[0, 3], [2, 1]]
    torch.testing.assert_close(r.weights, probs.gather(1, r.experts))
    rn = route(logits, 2, normalise=True)
    chosen = probs.gather(1, rn.experts)
    torch.testing.assert_close(rn.weights, chosen / chosen.sum(-1, keepdim=True))


def test_balance_loss_gradient_is_transformers() -> None:
    e, k = 8, 2
    base = torch.randn(32, e, generator=torch.Generator().manual_seed(3)) * 2
    ours_logits = base.clone().requires_grad_()
    balance_loss(route(ours_logits, k, True), e).backward()
    their_logits = base.clone().requires_grad_()
    load_balancing_loss_func((their_logits,), e, k).backward()
    assert ours_logits.grad.abs().sum() > 0
    torch.testing.assert_close(ours_logits.grad, their_logits.grad)


def test_losses_of_an_all_padding_batch_are_zero_not_nan() -> None:
    r = route(torch.randn(6, 4), 2, True)
    none = torch.zeros(6, dtype=torch.bool)
    assert balance_loss(r, 4, none).item() == 0.0
    assert z_loss(r, none).item() == 0.0
    layer = _layer()
    _, aux = layer(torch.randn(1, 6, 32), token_mask=none.reshape(1, 6))
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in aux.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.decoder.ffn.top_k=0", r"top_k=0 must be in 1\.\.experts=8"),
        ("model.decoder.ffn.every=0", r"every=0 leaves no sparse layer"),
        ("model.decoder.ffn.expert_dim=-1", r"expert_dim=-1 must be >= 0"),
    ],
)
def test_more_bad_moe_options_are_config_errors(override: str, message: str) -> None:
    base = ["model.decoder.layers=4", "model.decoder.ffn.type=moe"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, override])


def test_auto_uses_grouped_mm_where_it_is_supported(monkeypatch) -> None:
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = _layer(expert_matmul="auto")
    layer(torch.randn(2, 5, 32))
    assert calls


def test_expert_load_is_recorded_in_training_only() -> None:
    layer = _layer()
    x = torch.randn(2, 5, 32)
    layer(x)
    assert layer.last_load is None
    layer.train()(x)
    assert layer.last_load is not None and layer.last_load.sum().item() == 2 * 5 * 2


def test_expert_init_is_a_normal_truncated_at_three_std() -> None:
    layer = _layer()
    std = 0.1
    layer.experts.init_parameters(std)
    w = torch.cat([layer.experts.gate_up_proj.flatten(), layer.experts.down_proj.flatten()])
    assert w.abs().max() <= 3 * std
    assert w.abs().max() > 2.5 * std  # ~2% of 18k normal draws lie beyond 2.5 std
    assert abs(w.std().item() - std) < 0.01
