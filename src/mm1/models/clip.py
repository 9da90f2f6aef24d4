"""CLIP pre-training of MM1's ViT: a causal text tower, projections into a joint space, and a
learned temperature; the loss is the symmetric InfoNCE of `mm1.models.contrastive`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mm1.config import ModelConfig, VisionConfig
from mm1.config.encoder import CLIPObjectiveConfig, TextTowerConfig
from mm1.models.contrastive import gathered_clip_loss
from mm1.models.layers import init_weights
from mm1.models.vision import VisionTransformer, ViTBlock


@dataclass
class EncoderOutput:
    """The objective's loss (the global batch's for a gathered loss, else this rank's) and
    detached scalars to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def causal_mask(n: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, n, n) booleans: token i attends to tokens 0..i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]


class TextTransformer(nn.Module):
    """Token + position embeddings, pre-LN causal blocks (the ViT's block), a final LayerNorm;
    the feature of a caption is the output at its last token (its EOS)."""

    def __init__(self, cfg: TextTowerConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        block_cfg = VisionConfig(
            width=cfg.width,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_dim,
            act=cfg.act,
            norm_eps=cfg.norm_eps,
        )
        self.embed_tokens = nn.Embedding(vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_len, cfg.width))
        self.blocks = nn.ModuleList(ViTBlock(block_cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        init_weights(self)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) ids padded after each caption, (B,) lengths -> (B, width)."""
        n = input_ids.shape[1]
        x = self.embed_tokens(input_ids) + self.pos_embed[:, :n]
        mask = causal_mask(n, x.device)
        for block in self.blocks:
            x = block(x, mask)
        x = self.final_norm(x)
        return x[torch.arange(x.shape[0], device=x.device), lengths - 1]


class TextSide(nn.Module):
    """The text side of a contrastive objective (CLIP's; SEED's first stage): a text tower, its
    projection into the joint space, and the learned temperature."""

    clip_cfg: CLIPObjectiveConfig
    text: nn.Module
    text_proj: nn.Linear
    logit_scale: nn.Parameter

    def build_text_side(
        self,
        text: TextTowerConfig,
        clip: CLIPObjectiveConfig,
        vocab: int,
        embed_dim: int,
        text_tower: nn.Module | None,
    ) -> None:
        """`text_tower`: a tower built elsewhere (`HFTextTower`), else `TextTransformer`. The
        caller initialises `text_proj` (where, fixes what a seed draws for the other parts)."""
        self.clip_cfg = clip
        self.text = text_tower if text_tower is not None else TextTransformer(text, vocab)
        self.text_proj = nn.Linear(text.proj_in or text.width, embed_dim, bias=False)
        # One element, not a scalar: FSDP2 shards parameters on dim 0 and refuses 0-d ones.
        self.logit_scale = nn.Parameter(torch.tensor([float(clip.logit_scale_init)]))

    def scale(self) -> torch.Tensor:
        """exp(t), clamped at `logit_scale_max` as CLIP clamps it (no gradient beyond)."""
        return self.logit_scale.clamp(max=math.log(self.clip_cfg.logit_scale_max)).exp()

    def encode_text(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(input_ids, lengths))


class CLIPModel(TextSide):
    """MM1's ViT (`vision`, as `model.vision` builds it) and a text tower trained contrastively.
    The image feature is the mean of the patch features MM1's connector reads (the ViT's
    `feature_layer` output), so what is trained is what MM1 uses; then LayerNorm + projection."""

    gathered = True  # the loss is the global batch's on every rank (see contrastive.py)

    def __init__(
        self,
        model: ModelConfig,
        text: TextTowerConfig,
        clip: CLIPObjectiveConfig,
        vocab: int,
        text_tower: nn.Module | None = None,
    ) -> None:
        """`text_tower`: a tower built elsewhere (`HFTextTower`), else `TextTransformer`."""
        super().__init__()
        self.cfg = model
        w, e = model.vision.width, clip.embed_dim
        self.vision = VisionTransformer(model.vision)
        self.image_proj = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, e, bias=False))
        self.build_text_side(text, clip, vocab, e, text_tower)
        init_weights(self.image_proj)
        init_weights(self.text_proj)
        self.register_load_state_dict_pre_hook(_scalar_logit_scale)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.vision(pixel_values).mean(dim=1))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids, lengths)
        scale = self.scale()
        loss = gathered_clip_loss(image, text, scale)
        return EncoderOutput(loss, {"logit_scale": float(scale.detach())})


def _scalar_logit_scale(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Runs saved before the scale had one dimension hold it as a scalar: read it as one."""
    key = prefix + "logit_scale"
    if key in state and state[key].ndim == 0:
        state[key] = state[key].reshape(1)
