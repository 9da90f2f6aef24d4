"""The MoE layer: routing, dropless expert computation (grouped_mm and per-expert matmuls agree
with a token-by-token reference, gradients included), the auxiliary losses against known values
and transformers' load_balancing_loss_func, the layer layout and config errors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mm1.config import ConfigError, DecoderConfig, load_config
from mm1.models.decoder import Decoder, SwiGLU
from mm1.models.moe import MoE, MoEConfig, balance_loss, route, sparse_layers, z_loss
from mm1.models.summary import active_parameters, summarize

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _cfg(**moe: object) -> DecoderConfig:
    cfg = DecoderConfig(vocab_size=64, dim=32, layers=4, heads=4, kv_heads=2, ffn_dim=48)
    cfg.ffn = MoEConfig(**{"experts": 4, "top_k": 2, **moe})
    return cfg


def _layer(seed: int = 0, **moe: object) -> MoE:
    torch.manual_seed(seed)
    cfg = _cfg(**moe)
    layer = MoE(cfg, cfg.ffn)
    layer.gate.weight.data.normal_(0, 0.5)
    layer.experts.init_parameters(0.1)
    return layer


def _token_loop(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: sum over the chosen experts of weight * SwiGLU."""
    r = route(layer.gate(x), layer.top_k, layer.norm_topk_prob)
    gu, down = layer.experts.gate_up_proj, layer.experts.down_proj
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for w, e in zip(r.weights[t], r.experts[t]):
            g, u = (gu[e] @ x[t]).chunk(2)
            acc = acc + w * (down[e] @ (F.silu(g) * u))
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("matmul", ["grouped", "loop"])
def test_expert_paths_equal_the_token_by_token_definition(matmul: str) -> None:
    layer = _layer(expert_matmul=matmul)
    x = torch.randn(2, 9, 32)
    out, aux = layer(x)
    ref = _token_loop(layer, x.reshape(-1, 32)).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert set(aux) == {"router_balance", "router_z"}


def test_grouped_and_per_expert_agree_in_outputs_and_gradients(monkeypatch) -> None:
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 11, 32)
    x[..., 0] = 5.0
    results = []
    for matmul in ("grouped", "loop"):
        layer = _layer(expert_matmul=matmul)
        # an expert no token reaches (its slice is empty in both paths): dimension 0 pushes
        # every token away from expert 3
        layer.gate.weight.data[:, 0] = torch.tensor([0.5, 0.0, 0.0, -5.0])
        xi = x.clone().requires_grad_()
        out, aux = layer(xi)
        (out.pow(2).sum() + aux["router_balance"] + aux["router_z"]).backward()
        grads = [xi.grad] + [p.grad for p in layer.parameters()]
        results.append((out.detach(), grads))
    assert calls, "the grouped path did not call grouped_mm"
    (out_g, grads_g), (out_l, grads_l) = results
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-6)
    for grouped, loop in zip(grads_g, grads_l):
        torch.testing.assert_close(grouped, loop, rtol=1e-4, atol=1e-6)
    assert grads_g[-1][3].abs().sum() == 0  # the idle expert's down_proj got no gradient


@pytest.mark.parametrize("frozen", ["experts", "input"])
def test_per_expert_backward_skips_what_needs_no_gradient(frozen: str) -> None:
    """The per-expert path's hand-written backward with frozen experts or a frozen input,
    in bf16 autocast: the gradients that are asked for equal the grouped path's."""
    x = torch.randn(2, 9, 32)
    grads = []
    for matmul in ("grouped", "loop"):
        layer = _layer(expert_matmul=matmul)
        if frozen == "experts":
            layer.experts.requires_grad_(False)
        xi = x.clone().requires_grad_(frozen != "input")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(xi)
        out.float().pow(2).sum().backward()
        assert (layer.experts.down_proj.grad is None) == (frozen == "experts")
        asked = [p.grad for p in layer.parameters() if p.requires_grad]
        grads.append(asked + ([xi.grad] if xi.requires_grad else []))
    assert len(grads[0]) == len(grads[1]) >= 1
    for grouped, loop in zip(*grads):  # bf16 products round differently: compare in norm
        assert grouped.dtype == loop.dtype and grouped.shape == loop.shape
        assert (grouped - loop).float().norm() <= 1e-2 * grouped.float().norm()


def test_unaligned_widths_fall_back_to_per_expert_matmuls(monkeypatch) -> None:
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = _cfg()
    cfg.ffn_dim = 45  # 45 fp32 = 180 bytes per row: not a multiple of 16
    layer = MoE(cfg, cfg.ffn)
    layer.experts.init_parameters(0.1)
    x = torch.randn(10, 32)
    out, _ = layer(x)
    assert not calls
    torch.testing.assert_close(out, _token_loop(layer, x), rtol=1e-5, atol=1e-6)
    cfg.ffn = dataclasses.replace(cfg.ffn, expert_matmul="grouped")
    with pytest.raises(RuntimeError, match="expert_matmul=grouped"):
        MoE(cfg, cfg.ffn)(x)


def test_identical_experts_with_renormalised_top_k_equal_one_ffn() -> None:
    cfg = _cfg(experts=8, top_k=2)
    dense = SwiGLU(cfg)
    layer = MoE(cfg, cfg.ffn)
    gate_up = torch.cat([dense.gate_proj.weight, dense.up_proj.weight])
    layer.experts.gate_up_proj.data[:] = gate_up
    layer.experts.down_proj.data[:] = dense.down_proj.weight
    x = torch.randn(4, 7, 32)
    torch.testing.assert_close(layer(x)[0], dense(x), rtol=1e-5, atol=1e-6)
    # unnormalised, the output is the dense one scaled by the chosen probabilities' sum
    layer.norm_topk_prob = False
    r = route(layer.gate(x.reshape(-1, 32)), 2, False)
    scaled = dense(x) * r.weights.sum(-1).reshape(4, 7, 1)
    torch.testing.assert_close(layer(x)[0], scaled, rtol=1e-5, atol=1e-6)


def test_balance_loss_known_values_and_transformers() -> None:
    e, k, n = 8, 2, 64
    uniform = route(torch.zeros(n, e), k, True)
    assert balance_loss(uniform, e).item() == pytest.approx(k)
    # peaked on experts 0 and 1 for every token: E * (1 * ~0.5 + 1 * ~0.5) -> 8
    peaked = torch.full((n, e), -30.0)
    peaked[:, :2] = 0.0
    assert balance_loss(route(peaked, k, True), e).item() == pytest.approx(e, rel=1e-6)
    # balanced peaked routing: each token sure of its own pair, pairs spread evenly -> k
    balanced = torch.full((n, e), -30.0)
    for t in range(n):
        balanced[t, [2 * (t % 4), 2 * (t % 4) + 1]] = 0.0
    assert balance_loss(route(balanced, k, True), e).item() == pytest.approx(k, rel=1e-6)
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(1)) * 2
    ours = balance_loss(route(logits, k, True), e)
    theirs = load_balancing_loss_func((logits,), e, k)
    torch.testing.assert_close(ours, theirs.float())
    # masking a token out equals leaving it out
    mask = torch.ones(n, dtype=torch.bool)
    mask[5::7] = False
    torch.testing.assert_close(
        balance_loss(route(logits, k, True), e, mask), balance_loss(route(logits[mask], k, True), e)
    )
    theirs_masked = load_balancing_loss_func((logits,), e, k, attention_mask=mask[None].long())
    torch.testing.assert_close(balance_loss(route(logits, k, True), e, mask), theirs_masked)


def test_z_loss_known_values() -> None:
    assert z_loss(route(torch.zeros(5, 8), 2, True)).item() == pytest.approx(math.log(8) ** 2)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]])
    lse = [math.log(math.e + math.e**2 + math.e**3), math.log(4.0)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert z_loss(route(logits, 1, True)).item() == pytest.approx(expected, rel=1e-6)
    assert z_loss(route(logits, 1, True), torch.tensor([False, True])).item() == pytest.approx(
        lse[1] ** 2, rel=1e-6
    )


def test_layout_follows_qwen3_moe_and_aux_losses_average_over_layers() -> None:
    cfg = _cfg(every=2)
    assert sparse_layers(cfg) == [1, 3]
    torch.manual_seed(0)
    dec = Decoder(cfg)
    kinds = [type(b.mlp).__name__ for b in dec.layers]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    for block in dec.layers:
        if isinstance(block.mlp, MoE):  # routers that differ, so the layers' losses differ
            block.mlp.gate.weight.data.normal_(0, 0.5)
    ids = torch.randint(0, 64, (2, 10))
    aux: dict[str, torch.Tensor] = {}
    gate_logits: list[torch.Tensor] = []
    hooks = [
        b.mlp.gate.register_forward_hook(lambda m, i, o: gate_logits.append(o))
        for b in dec.layers
        if isinstance(b.mlp, MoE)
    ]
    dec(ids, aux_losses=aux)
    for h in hooks:
        h.remove()
    # each sparse layer's losses from its own router logits, then the mean over layers
    routes = [route(logits, 2, True) for logits in gate_logits]
    balance = [balance_loss(r, 4) for r in routes]
    assert len(balance) == 2 and not torch.isclose(balance[0], balance[1])
    torch.testing.assert_close(aux["router_balance"], (balance[0] + balance[1]) / 2)
    torch.testing.assert_close(aux["router_z"], sum(z_loss(r) for r in routes) / 2)
    assert aux["router_z"] > 0


def test_active_parameters_count_k_of_e_experts() -> None:
    cfg = _cfg(experts=8, top_k=2, every=2)
    dec = Decoder(cfg)
    per_expert = 3 * 32 * 48
    assert active_parameters(dec) == sum(p.numel() for p in dec.parameters()) - 2 * 6 * per_expert


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.decoder.ffn.experts=1", r"model\.decoder\.ffn\.experts=1 must be >= 2"),
        ("model.decoder.ffn.top_k=9", r"model\.decoder\.ffn\.top_k=9 must be in 1\.\.experts=8"),
        ("model.decoder.ffn.every=5", r"model\.decoder\.ffn\.every=5 leaves no sparse layer"),
        ("model.decoder.ffn.expert_matmul=fast", r"model\.decoder\.ffn\.expert_matmul='fast'"),
        ("model.decoder.ffn.capacity=1.0", r"model\.decoder\.ffn\.capacity is not an option"),
    ],
)
def test_bad_moe_options_are_one_line_errors(override: str, message: str) -> None:
    base = ["model.decoder.layers=4", "model.decoder.ffn.type=moe"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, override])


@pytest.mark.parametrize(
    ("preset", "experts", "every", "paper", "off_by"),
    [("mm1_3b_moe", 64, 2, 64e9, 0.01), ("mm1_7b_moe", 32, 4, 47e9, 0.15)],
)
def test_presets_count_their_experts_and_land_near_the_paper(
    preset: str, experts: int, every: int, paper: float, off_by: float
) -> None:
    moe_cfg = load_config(str(PRESETS / f"{preset}.yaml"), []).model
    dense_cfg = load_config(str(PRESETS / f"{preset.removesuffix('_moe')}.yaml"), []).model
    moe, dense = summarize(moe_cfg), summarize(dense_cfg)
    d = moe_cfg.decoder
    assert sparse_layers(d) == list(range(every - 1, d.layers, every))
    sparse, per_expert, router = d.layers // every, 3 * d.dim * d.ffn_dim, experts * d.dim
    # each sparse layer: E experts in place of one FFN, plus the router; two experts act
    assert moe.total == dense.total + sparse * ((experts - 1) * per_expert + router)
    assert moe.active == dense.decoder + sparse * (per_expert + router)
    assert abs(moe.total / paper - 1) < off_by


def test_the_token_mask_leaves_padding_out_of_the_router_statistics() -> None:
    cfg = _cfg(every=1)
    cfg.layers = 1
    torch.manual_seed(0)
    dec = Decoder(cfg)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False  # a padded tail
    logits = []
    dec.layers[0].mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o))
    aux: dict[str, torch.Tensor] = {}
    dec(ids, aux_losses=aux, token_mask=mask)
    r = route(logits[0], 2, True)
    flat = mask.reshape(-1)
    torch.testing.assert_close(aux["router_balance"], balance_loss(r, 4, flat))
    torch.testing.assert_close(aux["router_z"], z_loss(r, flat))
    assert not torch.allclose(aux["router_z"], z_loss(r))


def test_expert_load_is_each_forward_once_under_activation_checkpointing() -> None:
    """A checkpointed block runs its forward again in the backward pass; the load read after a
    micro-batch's forward (as the trainer reads it) is that forward's assignments alone."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from mm1.train.expert_load import last_expert_loads

    torch.manual_seed(0)
    dec = Decoder(_cfg(every=2)).train()
    for i, block in enumerate(dec.layers):
        dec.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    for seed in (0, 1):
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[0, 7:] = False  # two padding tokens are not counted
        dec(ids, token_mask=mask).sum().backward()
        loads = last_expert_loads(dec)
        assert sorted(loads) == [1, 3]
        assert all(load.sum().item() == 16 * 2 for load in loads.values())
