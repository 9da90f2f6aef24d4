"""Vision-language connectors: patch features (B, N, Dv) -> image tokens (B, Q, D_llm).

Each connector is registered by name (`model.connector.type`) with the dataclass of its options,
which also validates them; MM1's ablation found the type matters little and the number of tokens
a lot, so all take Q from the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import ConfigError, ConnectorConfig, parse_component
from mm1.models.layers import LayerNorm2d, init_weights, is_perfect_square
from mm1.registry import CONNECTORS

if TYPE_CHECKING:
    from mm1.config import ModelConfig

# Epsilons as honeybee runs on the timm it pins (0.9.8): its prenorm is timm's LayerNorm (1e-6),
# but the blocks pass LayerNorm2d through ConvNormAct -> get_norm_act_layer, which swaps it for
# LayerNormAct2d with its own default 1e-5 (LayerNorm2d's 1e-6 is never used).
_PRENORM_EPS = 1e-6
_BLOCK_EPS = 1e-5


def register(
    name: str, config: type[ConnectorConfig] = ConnectorConfig
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: the connector `name`, built as `cls(cfg, vision_width, grid, out_dim)`
    from its options `config` (a ConnectorConfig subclass; `validate` checks them)."""
    return CONNECTORS.register(name, config)


def build_connector(
    cfg: ConnectorConfig | dict, vision_width: int, grid: int, out_dim: int, init_std: float = 0.02
) -> nn.Module:
    """The connector named by `cfg.type` for a grid x grid patch map of width `vision_width`,
    initialised as `MM1.init_weights` does (truncated normal of std `init_std`)."""
    cfg = parse_component(CONNECTORS, "model.connector", cfg, ConnectorConfig)
    module = CONNECTORS[cfg.type].value(cfg, vision_width, grid, out_dim)
    init_weights(module, init_std)
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    return module


def mlp(dims: list[int], act: type[nn.Module], bias: bool = True) -> nn.Sequential:
    """Linear layers through `dims` with `act` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        if i:
            layers.append(act())
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
    return nn.Sequential(*layers)


def _pooled_side(cfg: ConnectorConfig, grid: int) -> int:
    q = cfg.num_tokens or grid * grid
    if not is_perfect_square(q):
        raise ValueError(
            f"model.connector.num_tokens={q} is not a perfect square; connector "
            f"{cfg.type!r} pools to a sqrt(Q) x sqrt(Q) grid"
        )
    return math.isqrt(q)


def _check_per_patch(cfg: ConnectorConfig, key: str, model: ModelConfig) -> None:
    n = model.vision.num_patches
    if cfg.num_tokens not in (0, n):
        raise ConfigError(
            f"{key}.num_tokens={cfg.num_tokens}: connector '{cfg.type}' maps each of the "
            f"{n} patches to one token; set num_tokens to 0 or {n}"
        )


def _check_pooled(cfg: ConnectorConfig, key: str, model: ModelConfig) -> None:
    q, grid = cfg.num_tokens, model.vision.grid
    side = math.isqrt(q or grid * grid)
    if side * side != (q or grid * grid):
        raise ConfigError(
            f"{key}.num_tokens={q} is not a perfect square: connector "
            f"'{cfg.type}' pools the patch grid to a sqrt(Q) x sqrt(Q) grid (e.g. 64, 144)"
        )
    if side > grid:
        raise ConfigError(
            f"{key}.num_tokens={q} needs a {side}x{side} grid but the encoder "
            f"only has {grid}x{grid} patches"
        )


def _check_mlp_depth(key: str, mlp_depth: int) -> None:
    if mlp_depth < 1:
        raise ConfigError(f"{key}.mlp_depth={mlp_depth} must be >= 1")


@dataclass
class LinearConnectorConfig(ConnectorConfig):
    type: str = "linear"

    def validate(self, key: str, model: ModelConfig) -> None:
        super().validate(key, model)
        _check_per_patch(self, key, model)


@dataclass
class MLPConnectorConfig(ConnectorConfig):
    type: str = "mlp"
    mlp_depth: int = 2  # number of Linear layers

    def validate(self, key: str, model: ModelConfig) -> None:
        super().validate(key, model)
        _check_per_patch(self, key, model)
        _check_mlp_depth(key, self.mlp_depth)


@dataclass
class AvgPoolConnectorConfig(ConnectorConfig):
    type: str = "avgpool"

    def validate(self, key: str, model: ModelConfig) -> None:
        super().validate(key, model)
        _check_pooled(self, key, model)


@dataclass
class AttnPoolConnectorConfig(ConnectorConfig):
    type: str = "attnpool"
    heads: int = 8  # attention heads

    def validate(self, key: str, model: ModelConfig) -> None:
        super().validate(key, model)
        if self.num_tokens <= 0:
            raise ConfigError(f"{key}.num_tokens={self.num_tokens} must be positive")
        width = model.vision.width
        if self.heads <= 0 or width % self.heads:
            raise ConfigError(f"{key}.heads={self.heads} does not divide vision.width={width}")


@dataclass
class CAbstractorConfig(ConnectorConfig):
    type: str = "c_abstractor"
    hidden: int = 1024  # width of the RegNet stages
    depth: int = 3  # RegNet blocks per stage
    mlp_depth: int = 2  # readout: number of Linear layers
    layer_norm: bool = False  # LayerNorm on the input features

    def validate(self, key: str, model: ModelConfig) -> None:
        super().validate(key, model)
        _check_pooled(self, key, model)
        _check_mlp_depth(key, self.mlp_depth)
        if self.depth < 0:
            raise ConfigError(f"{key}.depth={self.depth} must be >= 0")
        if self.hidden <= 0:
            raise ConfigError(f"{key}.hidden={self.hidden} must be positive")


@dataclass
class PixelShuffleConnectorConfig(ConnectorConfig):
    type: str = "pixel_shuffle"
    mlp_depth: int = 1  # number of Linear layers (GELU between); Idefics3 / SmolVLM use 1
    bias: bool = False  # biases on the Linear layers (Idefics3 / SmolVLM have none)

    def validate(self, key: str, model: ModelConfig) -> None:
        super().validate(key, model)
        _check_pooled(self, key, model)
        _check_mlp_depth(key, self.mlp_depth)
        grid, side = model.vision.grid, math.isqrt(self.num_tokens or model.vision.num_patches)
        if grid % side:
            raise ConfigError(
                f"{key}.num_tokens={self.num_tokens}: connector 'pixel_shuffle' folds r x r "
                f"patches into one token, so sqrt(Q)={side} must divide the {grid}x{grid} patch "
                "grid (e.g. Q = (grid / 2)^2 for r = 2)"
            )


def _to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, N, C) -> (B, C, grid, grid)."""
    b, n, c = x.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid}x{grid}={grid * grid} patch features, got {n}")
    return x.transpose(1, 2).reshape(b, c, grid, grid)


@register("linear", LinearConnectorConfig)
class LinearConnector(nn.Module):
    """One linear map per patch (Q = N)."""

    def __init__(
        self, cfg: LinearConnectorConfig, vision_width: int, grid: int, out_dim: int
    ) -> None:
        super().__init__()
        self.num_tokens = grid * grid
        self.proj = nn.Linear(vision_width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@register("mlp", MLPConnectorConfig)
class MLPConnector(nn.Module):
    """LLaVA-1.5's projector: Linear-GELU-Linear per patch (Q = N)."""

    def __init__(self, cfg: MLPConnectorConfig, vision_width: int, grid: int, out_dim: int) -> None:
        super().__init__()
        self.num_tokens = grid * grid
        self.proj = mlp([vision_width] + [out_dim] * cfg.mlp_depth, nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@register("pixel_shuffle", PixelShuffleConnectorConfig)
class PixelShuffleConnector(nn.Module):
    """Space-to-depth (Idefics3, SmolVLM, nanoVLM): each r x r block of patches becomes one
    token of r^2 times the width, features ordered (row in block, column in block, channel),
    tokens in row-major order; then Linear layers. Q = (grid / r)^2; nothing is pooled away."""

    def __init__(
        self, cfg: PixelShuffleConnectorConfig, vision_width: int, grid: int, out_dim: int
    ) -> None:
        super().__init__()
        self.grid, self.side = grid, _pooled_side(cfg, grid)
        self.scale = grid // self.side
        self.num_tokens = self.side**2
        dims = [vision_width * self.scale**2] + [out_dim] * cfg.mlp_depth
        self.proj = mlp(dims, nn.GELU, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if n != self.grid * self.grid:
            raise ValueError(f"expected {self.grid}x{self.grid} patch features, got {n}")
        s, r = self.side, self.scale
        blocks = x.view(b, s, r, s, r, c).permute(0, 1, 3, 2, 4, 5)
        return self.proj(blocks.reshape(b, s * s, r * r * c))


@register("avgpool", AvgPoolConnectorConfig)
class AvgPoolConnector(nn.Module):
    """Average-pool the patch grid to sqrt(Q) x sqrt(Q), then a linear map."""

    def __init__(
        self, cfg: AvgPoolConnectorConfig, vision_width: int, grid: int, out_dim: int
    ) -> None:
        super().__init__()
        self.grid, self.side = grid, _pooled_side(cfg, grid)
        self.num_tokens = self.side**2
        self.proj = nn.Linear(vision_width, out_dim)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, C) patch features -> (N, Q, C), the pooled features `proj` maps."""
        pooled = F.adaptive_avg_pool2d(_to_grid(x, self.grid), self.side)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))


@register("attnpool", AttnPoolConnectorConfig)
class AttnPoolConnector(nn.Module):
    """Q learned queries cross-attend to the patch features (the Perceiver / Q-Former family)."""

    def __init__(
        self, cfg: AttnPoolConnectorConfig, vision_width: int, grid: int, out_dim: int
    ) -> None:
        super().__init__()
        if cfg.num_tokens <= 0:
            raise ValueError("model.connector.num_tokens must be > 0 for 'attnpool'")
        self.num_tokens, self.heads = cfg.num_tokens, cfg.heads
        self.queries = nn.Parameter(torch.zeros(cfg.num_tokens, vision_width))
        self.norm_kv = nn.LayerNorm(vision_width)
        self.q_proj = nn.Linear(vision_width, vision_width)
        self.k_proj = nn.Linear(vision_width, vision_width)
        self.v_proj = nn.Linear(vision_width, vision_width)
        self.out_proj = nn.Linear(vision_width, vision_width)
        self.norm_out = nn.LayerNorm(vision_width)
        self.proj = nn.Linear(vision_width, out_dim)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        kv = self.norm_kv(x)
        q = self.q_proj(self.queries).view(1, -1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)
        k = self.k_proj(kv).view(b, n, h, d // h).transpose(1, 2)
        v = self.v_proj(kv).view(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        return self.proj(self.norm_out(self.out_proj(out)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


def se_width(in_ch: int, channels: int) -> int:
    """Squeeze-excite width of a RegNet block as timm builds it: round(0.25 * in_ch) (Python's
    round), and when that is 0, SEModule's own default: `channels / 16` made divisible by 8 with
    a floor of 8 (`make_divisible(channels / 16, 8, round_limit=0)`)."""
    width = round(0.25 * in_ch)
    if width:
        return width
    return max(8, int(channels / 16 + 4) // 8 * 8)


class RegNetBottleneck(nn.Module):
    """RegNet bottleneck (ratio 1, depthwise 3x3, squeeze-excite 0.25) with LayerNorm2d + SiLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch, eps=_BLOCK_EPS)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1, groups=out_ch, bias=False),
            LayerNorm2d(out_ch, eps=_BLOCK_EPS),
        )
        self.se = SqueezeExcite(out_ch, se_width(in_ch, out_ch))
        self.conv3 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch, eps=_BLOCK_EPS)
        )
        self.shortcut = (
            nn.Identity()
            if in_ch == out_ch
            else nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch, eps=_BLOCK_EPS)
            )
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        y = self.conv3(self.se(y))
        return self.act(y + self.shortcut(x))


def regnet_stage(depth: int, in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        *(RegNetBottleneck(in_ch if i == 0 else out_ch, out_ch) for i in range(depth))
    )


@register("c_abstractor", CAbstractorConfig)
class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor, as MM1 uses it.

    positional embedding -> RegNet stage (depth blocks, Dv -> hidden) -> adaptive average pool to
    sqrt(Q) x sqrt(Q) -> RegNet stage (depth blocks) -> readout MLP (hidden -> D_llm).
    With depth 0 it is pool + MLP on the raw features.
    """

    def __init__(self, cfg: CAbstractorConfig, vision_width: int, grid: int, out_dim: int) -> None:
        super().__init__()
        self.grid, self.side = grid, _pooled_side(cfg, grid)
        self.num_tokens = self.side**2
        hidden = cfg.hidden if cfg.depth > 0 else vision_width
        self.norm = nn.LayerNorm(vision_width, eps=_PRENORM_EPS) if cfg.layer_norm else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, vision_width))
        self.s1 = regnet_stage(cfg.depth, vision_width, hidden)
        self.s2 = regnet_stage(cfg.depth, hidden, hidden)
        self.readout = mlp([hidden] + [out_dim] * cfg.mlp_depth, nn.SiLU)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        x = _to_grid(x + self.pos_embed, self.grid)
        x = self.s2(F.adaptive_avg_pool2d(self.s1(x), self.side))
        return self.readout(x.flatten(2).transpose(1, 2))
