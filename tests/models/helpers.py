"""Helpers shared by the model tests."""

from __future__ import annotations

import torch

# The switches that make mm1's decoder Persimmon's (with kv_heads = heads).
PERSIMMON_SWITCHES = dict(
    norm="layer",
    rope_fraction=0.5,
    qk_norm=True,
    qkv_bias=True,
    o_bias=True,
    ffn={"type": "mlp", "activation": "relu2"},
)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Moves every weight away from its init (zero biases, unit norms), so each one matters in
    a comparison, and puts the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()
