"""A Fuyu-style model (`model.family: fuyu`): no image encoder. Each image's raw patches are
flattened and projected by one Linear layer into the decoder's width, row by row, with a
newline token after each row of patches (Adept's Fuyu-8B; transformers' `FuyuForCausalLM`).

The decoder is mm1's, with any of its switches; Fuyu-8B's own, Persimmon (LayerNorm, squared
ReLU, partial rotary), is one setting of them. With the `fuyu` image layout each image lies on
Fuyu's canvas (`model.image_layout.canvas`, [height, width] px, else the `model.vision.image_size`
square: shrunk to fit with its aspect kept, padded right and below, as transformers' Fuyu
processor does) and only the patches that cover it become tokens; with `single` every image is
resized to the square and gives the whole grid. The newline is a learned vector (written where
the image's slots end a row); Fuyu-8B's is its `|NEWLINE|` token's embedding, which is where a
model read from its directory starts it (`mm1.models.hf.fuyu`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mm1.config import ConfigError, ModelConfig
from mm1.models.decoder import Decoder
from mm1.models.family import MM1_FAMILY, ModelFamily, decoder_blocks, mm1_hf
from mm1.models.layers import init_weights
from mm1.models.mllm import MLLM
from mm1.registry import FAMILIES
from mm1.tiling import fuyu_canvas, fuyu_grid

LAYOUTS = ("fuyu", "single")  # the image layouts a fuyu model reads


class Patchify(nn.Module):
    """(N, C, H, W) images -> (N, rows x cols, p x p x C) patches, row by row, each flattened in
    (y, x, channel) order: the order of transformers' `FuyuImageProcessor.patchify_image`."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n, c, h, w = pixels.shape
        p = self.patch_size
        patches = pixels.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(n, (h // p) * (w // p), p * p * c)


class Fuyu(MLLM):
    """Patches -> Linear -> image tokens, a newline after each row; then mm1's decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        v = cfg.vision
        self.canvas = fuyu_canvas(cfg.image_layout.canvas, v.image_size)  # (height, width)
        self.rows, self.cols = (side // v.patch_size for side in self.canvas)
        self.vision = Patchify(v.patch_size)  # no weights: Fuyu has no image encoder
        # Fuyu's `vision_embed_tokens`: the one learned map from pixels to the decoder.
        self.connector = nn.Linear(3 * v.patch_size**2, cfg.decoder.dim)
        self.decoder = Decoder(cfg.decoder, cfg.init_std)
        self.image_newline = nn.Parameter(torch.empty(cfg.decoder.dim))
        self._reset_image_parts()

    @torch.no_grad()
    def _reset_image_parts(self) -> None:
        init_weights(self.connector, self.cfg.init_std)
        nn.init.normal_(self.image_newline, std=1 / math.sqrt(self.cfg.decoder.dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        self._reset_image_parts()
        self.decoder.init_weights()

    @property
    def num_image_tokens(self) -> int:
        return self.rows * (self.cols + 1)

    def image_tokens(
        self,
        pixel_values: torch.Tensor,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each image's rows of projected patches, a newline after each row, in slot order;
        on Fuyu's canvas (layout fuyu) only the patches that cover the image, from its original
        size (`image_sizes`, (height, width) per image)."""
        feats = self.image_features(pixel_values)
        n, _, d = feats.shape
        grid = feats.reshape(n, self.rows, self.cols, d)
        newline = self.image_newline.to(feats.dtype)
        if self.cfg.image_layout.type != "fuyu":
            return torch.cat([grid, newline.expand(n, self.rows, 1, d)], dim=2).reshape(-1, d)
        if image_sizes is None or len(image_sizes) != n:
            raise ValueError("the fuyu layout needs image_sizes (height, width) for every image")
        patch = self.cfg.vision.patch_size
        out = []
        for image, (h, w) in zip(grid, image_sizes.tolist()):
            rows, cols = fuyu_grid((w, h), self.canvas, patch)
            kept = image[:rows, :cols]
            out.append(torch.cat([kept, newline.expand(rows, 1, d)], dim=1).reshape(-1, d))
        return torch.cat(out)


def _num_image_tokens(cfg: ModelConfig) -> int:
    height, width = fuyu_canvas(cfg.image_layout.canvas, cfg.vision.image_size)
    p = cfg.vision.patch_size
    return (height // p) * (width // p + 1)


def _validate(cfg: ModelConfig, prefix: str) -> None:
    if cfg.image_layout.type not in LAYOUTS:
        raise ConfigError(
            f"{prefix}.image_layout.type={cfg.image_layout.type}: model.family=fuyu takes each "
            "image whole, on Fuyu's padded canvas (fuyu) or resized to the square (single); "
            "its tokens are the image's patches, not crops of an encoder"
        )


def _describe(cfg: ModelConfig) -> str:
    p = cfg.vision.patch_size
    canvas = cfg.image_layout.canvas if cfg.image_layout.type == "fuyu" else None
    height, width = fuyu_canvas(canvas, cfg.vision.image_size)
    where = "Fuyu's canvas" if cfg.image_layout.type == "fuyu" else "the square"
    return (
        f"no encoder: {where} {height} x {width}px / patch {p} = {height // p} x {width // p} "
        "patches, each patch's pixels -> Linear, a newline token after each row"
    )


FUYU_FAMILY = FAMILIES.register("fuyu")(
    ModelFamily(
        "fuyu",
        Fuyu,
        mm1_hf,
        decoder_blocks,
        MM1_FAMILY.init_buffers,  # the decoder's RoPE buffers
        num_image_tokens=_num_image_tokens,
        validate=_validate,
        describe=_describe,
        has_encoder=False,
    )
)
