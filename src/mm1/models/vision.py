"""The image encoder: a ViT in the CLIP or SigLIP layout, returning patch features of one layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import VisionConfig
from mm1.models.layers import activation, init_weights


def resolve_feature_layer(feature_layer: int, layers: int) -> int:
    """Hidden-state index as transformers counts them (0 = embeddings, i = after block i)."""
    index = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer
    if not 0 <= index <= layers:
        raise ValueError(f"feature_layer={feature_layer} is outside 0..{layers}")
    return index


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention over `x` (B, N, width), or cross-attention from `x` to `context`
        (B, M, width) when given (a Q-Former's queries reading the patches)."""
        b, n, d = x.shape
        kv = x if context is None else context

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.self_attn = ViTAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp_dim),
            activation(cfg.act),
            nn.Linear(cfg.mlp_dim, cfg.width),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: (B or 1, 1, N, N) booleans, True where a token may attend (None: all)."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """ViT that maps pixels (B, 3, H, W) to the patch features (B, N, width) of one layer.

    CLIP: patch conv without bias, a CLS token, a LayerNorm before the blocks. SigLIP: patch conv
    with bias, no CLS token, no pre-norm. Only the blocks up to `feature_layer` are built, so no
    parameter goes unused (DDP and FSDP need every parameter to get a gradient).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(
            3, w, cfg.patch_size, cfg.patch_size, bias=cfg.variant == "siglip"
        )
        self.cls_token = nn.Parameter(torch.zeros(w)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + cfg.cls_token, w))
        self.pre_norm = nn.LayerNorm(w, eps=cfg.norm_eps) if cfg.variant == "clip" else None
        depth = resolve_feature_layer(cfg.feature_layer, cfg.layers)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(depth))
        self.reset_parameters()

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def grid(self) -> int:
        return self.cfg.grid

    def reset_parameters(self) -> None:
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(
        self, pixel_values: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch features; `attn_mask` (B, 1, T, T) over the T tokens (CLS first, if any),
        True where attention is allowed: AIM's prefix-causal pre-training. MM1 passes none."""
        size = self.cfg.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"images of {tuple(pixel_values.shape[-2:])} px do not match the encoder's "
                f"{size}x{size} (model.vision.image_size)"
            )
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x[:, 1:] if self.cls_token is not None else x

    @torch.no_grad()
    def resize_position_embeddings(self, image_size: int) -> None:
        """Interpolate the position embeddings to a new image size (bicubic, as transformers'
        `interpolate_pos_encoding`), e.g. 378 -> 672 px before high-resolution fine-tuning."""
        if image_size % self.cfg.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of the patch size")
        self.pos_embed = nn.Parameter(
            interpolate_pos_embed(
                self.pos_embed.data, image_size // self.cfg.patch_size, self.cfg.cls_token
            )
        )
        self.cfg.image_size = image_size


def interpolate_pos_embed(pos: torch.Tensor, new_grid: int, has_cls: bool) -> torch.Tensor:
    """Bicubic interpolation of (1, [1 +] g*g, D) position embeddings to a new_grid x new_grid."""
    cls, patches = (pos[:, :1], pos[:, 1:]) if has_cls else (pos[:, :0], pos)
    g = math.isqrt(patches.shape[1])
    if g * g != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} position embeddings do not form a square grid")
    if g == new_grid:
        return pos
    d = patches.shape[-1]
    grid = patches.reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
