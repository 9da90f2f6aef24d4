"""AIM pre-training of MM1's ViT: prefix-causal attention over the patches (bidirectional within
a random prefix, causal after it), and a pixel head that predicts each next patch's pixels,
normalised per patch; the loss counts only the patches after the prefix (AIM, El-Nouby et al.).
In MM1 the trained encoder runs bidirectionally (no mask), as AIM's prefix training intends."""

from __future__ import annotations

import torch
from torch import nn

from mm1.config import ModelConfig
from mm1.config.encoder import AIMObjectiveConfig
from mm1.models.clip import EncoderOutput
from mm1.models.layers import init_weights
from mm1.models.vision import VisionTransformer


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in the ViT's order (row-major, as the
    patch convolution's output is flattened), each patch's pixels as (row, column, channel)."""
    b, c, h, w = pixel_values.shape
    x = pixel_values.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), -1)


def normalised_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels minus their mean, over their standard deviation (AIM's and MAE's
    normalised-pixel targets)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def prefix_causal_mask(prefix: torch.Tensor, num_patches: int, cls: bool) -> torch.Tensor:
    """(B, 1, T, T) booleans over the T = [CLS +] N tokens: token i attends to j when j <= i or
    j lies in the prefix (its first `prefix[b]` patches; the CLS token, if any, is always in)."""
    t = num_patches + int(cls)
    idx = torch.arange(t, device=prefix.device)
    causal = idx[None, :] <= idx[:, None]  # [i, j]: j <= i
    in_prefix = idx[None, :] < (prefix[:, None] + int(cls))  # [b, j]
    return (causal[None] | in_prefix[:, None, :])[:, None]


def target_mask(prefix: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, N - 1) booleans: prediction k (made at patch k, of patch k + 1) counts in the loss
    when patch k + 1 is after the prefix."""
    targets = torch.arange(1, num_patches, device=prefix.device)
    return targets[None, :] >= prefix[:, None]


def sample_prefix(
    batch: int, num_patches: int, min_prefix: int, generator: torch.Generator | None
) -> torch.Tensor:
    """A prefix length per image, uniform in [min_prefix, num_patches - 1]."""
    return torch.randint(min_prefix, num_patches, (batch,), generator=generator)


class AIMModel(nn.Module):
    """MM1's ViT (`vision`) with a pixel-regression head (`pixel_head`)."""

    gathered = False  # the loss is this rank's mean (each image weighs the same on every rank)

    def __init__(self, model: ModelConfig, aim: AIMObjectiveConfig) -> None:
        super().__init__()
        self.cfg = model
        self.aim_cfg = aim
        v = model.vision
        self.vision = VisionTransformer(v)
        layers: list[nn.Module] = [nn.LayerNorm(v.width)]
        width = v.width
        for _ in range(aim.head_layers - 1):
            layers += [nn.Linear(width, aim.head_dim), nn.GELU()]
            width = aim.head_dim
        layers.append(nn.Linear(width, v.patch_size * v.patch_size * 3))
        self.pixel_head = nn.Sequential(*layers)
        init_weights(self.pixel_head)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        v = self.cfg.vision
        n = v.num_patches
        prefix = sample_prefix(pixel_values.shape[0], n, self.aim_cfg.min_prefix, generator)
        prefix = prefix.to(pixel_values.device)
        mask = prefix_causal_mask(prefix, n, v.cls_token)
        feats = self.vision(pixel_values, mask)
        pred = self.pixel_head(feats[:, :-1]).float()
        target = normalised_patches(patchify(pixel_values.float(), v.patch_size)[:, 1:])
        per_patch = (pred - target).pow(2).mean(dim=-1)
        counted = target_mask(prefix, n).float()
        loss = ((per_patch * counted).sum(1) / counted.sum(1)).mean()
        return EncoderOutput(loss, {"prefix_mean": float(prefix.float().mean())})
