"""Small building blocks shared by the encoder, the connectors and the decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    """relu(x)^2 (Primer; Persimmon's `relu2`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def activation(name: str) -> nn.Module:
    if name == "relu2":
        return SquaredReLU()
    if name == "relu":
        return nn.ReLU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}")


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like the Llama reference."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def norm_layer(kind: str, dim: int, eps: float) -> nn.Module:
    """`rms` (RMSNorm) or `layer` (LayerNorm with a bias), as `model.decoder.norm` names."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal init for linear, conv and embedding weights; zeros for biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d | nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()
        elif hasattr(m, "init_parameters"):  # modules holding raw parameters (MoE experts)
            m.init_parameters(std)


def is_perfect_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
