"""Helpers shared by the model tests."""

from __future__ import annotations

import torch


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Moves every weight away from its init (zero biases, unit norms), so each one matters in
    a comparison, and puts the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()
