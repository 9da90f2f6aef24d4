"""High-resolution image layouts: `PromptFormat`s whose images become several crops.

Each layout decides, from an image's size alone, its crops and its image tokens (`slots`), and
cuts the crops (`crop`) as PIL images of exactly the encoder's input size, which the image
processor then only rescales and normalises. The model assembles the crops' features by the
same arithmetic (`mm1.tiling`), so slots written and tokens produced agree (tested on random
sizes for every layout).

- `mm1`: the overview (the processor's own view of the image) first, then the image processed
  at twice the crop size cut into 2 x 2 crops, row by row: 5Q tokens.
- `anyres` (LLaVA-NeXT, transformers' PIL processor to the pixel): the base image (a plain
  resize to the crop size) first, then the canvas `select_best_resolution` picks, the image
  fitted into it (aspect kept) and centred on black, cut row by row. Tokens: Q for the base,
  then the tiles' unpadded feature grid with a newline token after each row.
- `dynamic` (InternVL / MM1.5): the image resized to the (cols x rows) grid of min..max tiles
  closest to its aspect ratio, cut row by row, with the overview (a plain resize to the crop
  size) first or last when there is more than one tile: (tiles [+ 1]) x Q tokens.

- `fuyu` (`model.family: fuyu`): the image on Fuyu's padded canvas, one crop, its tokens the
  patches that cover it with a newline after each row (`FuyuFormat`).

`high_res=False` gives an image the `single` form (one crop, Q tokens), as MM1 does for all
but the last images of a many-shot prompt; the model tells it apart by its one crop.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from PIL import Image

from mm1.data.prompt_format import PromptFormat, register_layout
from mm1.tiling import (
    anyres_grid,
    anyres_tokens,
    canvas_candidates,
    dynamic_grid,
    fit_size,
    fuyu_canvas,
    fuyu_fit,
    fuyu_grid,
    pad_offset,
)

if TYPE_CHECKING:
    import torch

    from mm1.config import ImageLayoutConfig, ModelConfig
    from mm1.data.images import ImageProcessor


def _tiles(image: Image.Image, crop: int) -> list[Image.Image]:
    """An image whose sides are multiples of `crop` cut into crop x crop pieces, row by row."""
    return [
        image.crop((x, y, x + crop, y + crop))
        for y in range(0, image.height, crop)
        for x in range(0, image.width, crop)
    ]


@dataclass(frozen=True)
class TiledFormat(PromptFormat, ABC):
    """A layout with several crops per image; `crop_size` is the encoder's input side."""

    crop_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int):
            raise ValueError(f"crop_size must be an int, got {self.crop_size!r}")
        if self.crop_size < 1:
            raise ValueError(f"the {self.layout} layout needs crop_size (the encoder's input px)")

    @classmethod
    def from_model(cls, base: PromptFormat, model: ModelConfig) -> TiledFormat:
        """The format of `model`'s layout over `base` (Q, boundaries, template)."""
        return cls.from_layout(base, model.image_layout, model.vision.image_size)

    @classmethod
    def from_layout(
        cls, base: PromptFormat, layout: ImageLayoutConfig, crop_size: int
    ) -> TiledFormat:
        return cls(base.image_tokens, base.image_boundaries, base.chat_template, crop_size)

    # Subclasses give `crops_for_size` (and `slots_for_size` where tokens are not crops x Q)
    # and `cut`.
    def crop(
        self, image: Image.Image, processor: ImageProcessor | None = None, high_res: bool = True
    ) -> list[Image.Image]:
        if not high_res:
            return [image]
        if processor is None:
            raise ValueError(f"the {self.layout} layout cuts crops with the image processor")
        pieces = self.cut(image, processor)
        if any(p.size != (self.crop_size, self.crop_size) for p in pieces):
            raise ValueError(
                f"the {self.layout} layout needs an image processor whose output is "
                f"{self.crop_size} px square (model.vision.image_size)"
            )
        return pieces

    @abstractmethod
    def cut(self, image: Image.Image, processor: ImageProcessor) -> list[Image.Image]:
        """The crops of `image`, in slot order: each layout below says how it cuts."""


@register_layout
@dataclass(frozen=True)
class MM1Format(TiledFormat):
    """MM1's sub-image decomposition: overview, then 2 x 2 crops of the image at 2x."""

    layout: ClassVar[str] = "mm1"

    def crops_for_size(self, size: tuple[int, int]) -> int:
        return 5

    def cut(self, image: Image.Image, processor: ImageProcessor) -> list[Image.Image]:
        overview = Image.fromarray(processor.resized_pixels(image).transpose(1, 2, 0))
        big = Image.fromarray(processor.scaled(2).resized_pixels(image).transpose(1, 2, 0))
        return [overview, *_tiles(big, self.crop_size)]


@register_layout
@dataclass(frozen=True)
class AnyresFormat(TiledFormat):
    """LLaVA-NeXT's anyres: base image, then the best canvas's tiles (see the module)."""

    layout: ClassVar[str] = "anyres"
    pinpoints: list[list[int]] | None = None
    grid: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.crop_size
        for w, h in self.canvases:
            if w < c or h < c or w % c or h % c:
                raise ValueError(f"anyres canvas {w}x{h} is not a grid of {c} px crops")

    @classmethod
    def from_layout(
        cls, base: PromptFormat, layout: ImageLayoutConfig, crop_size: int
    ) -> AnyresFormat:
        return cls(
            base.image_tokens,
            base.image_boundaries,
            base.chat_template,
            crop_size,
            pinpoints=[list(p) for p in layout.pinpoints] if layout.pinpoints else None,
            grid=list(layout.grid) if layout.grid else None,
        )

    @property
    def canvases(self) -> list[tuple[int, int]]:
        """The candidate canvases (width, height) in px."""
        return canvas_candidates(self.crop_size, self.pinpoints, self.grid)

    def grid_for_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return anyres_grid(size, self.crop_size, self.canvases)

    def crops_for_size(self, size: tuple[int, int]) -> int:
        rows, cols = self.grid_for_size(size)
        return 1 + rows * cols

    def slots_for_size(self, size: tuple[int, int]) -> int:
        rows, cols = self.grid_for_size(size)
        return anyres_tokens(size, rows, cols, math.isqrt(self.image_tokens))

    def cut(self, image: Image.Image, processor: ImageProcessor) -> list[Image.Image]:
        image = processor.to_rgb(image)
        rows, cols = self.grid_for_size(image.size)
        canvas = (cols * self.crop_size, rows * self.crop_size)
        fitted = fit_size(image.size, canvas)
        padded = Image.new("RGB", canvas, (0, 0, 0))
        padded.paste(image.resize(fitted, resample=processor.resample), pad_offset(fitted, canvas))
        base = image.resize((self.crop_size, self.crop_size), resample=processor.resample)
        return [base, *_tiles(padded, self.crop_size)]


@register_layout
@dataclass(frozen=True)
class DynamicFormat(TiledFormat):
    """InternVL / MM1.5 dynamic tiling (see the module)."""

    layout: ClassVar[str] = "dynamic"
    min_tiles: int = 1
    max_tiles: int = 6
    overview: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles ({self.min_tiles}) <= max_tiles")
        if self.overview not in ("first", "last"):
            raise ValueError(f"overview must be 'first' or 'last', got {self.overview!r}")

    @classmethod
    def from_layout(
        cls, base: PromptFormat, layout: ImageLayoutConfig, crop_size: int
    ) -> DynamicFormat:
        return cls(
            base.image_tokens,
            base.image_boundaries,
            base.chat_template,
            crop_size,
            min_tiles=layout.min_tiles,
            max_tiles=layout.max_tiles,
            overview=layout.overview,
        )

    def grid_for_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return dynamic_grid(size, self.min_tiles, self.max_tiles, self.crop_size)

    def crops_for_size(self, size: tuple[int, int]) -> int:
        rows, cols = self.grid_for_size(size)
        return rows * cols + (rows * cols > 1)

    def cut(self, image: Image.Image, processor: ImageProcessor) -> list[Image.Image]:
        image = processor.to_rgb(image)
        rows, cols = self.grid_for_size(image.size)
        c = self.crop_size
        tiles = _tiles(image.resize((cols * c, rows * c), resample=processor.resample), c)
        if len(tiles) == 1:
            return tiles
        overview = image.resize((c, c), resample=processor.resample)
        return [overview, *tiles] if self.overview == "first" else [*tiles, overview]


@register_layout
@dataclass(frozen=True)
class FuyuFormat(PromptFormat):
    """Fuyu's canvas (`model.family: fuyu` only): the image shrunk to fit the `canvas`
    ((height, width) px; an int is a square) if larger (aspect kept, never enlarged), placed
    top left and padded right and below with
    the value 1 (of 255, as transformers' Fuyu processor pads before rescaling). Its tokens are
    the patches that cover the image, row by row, a newline after each row: rows x (cols + 1)
    slots, `image_tokens` (the whole canvas) at most. One crop per image, whatever `high_res`:
    the image's size alone sets its tokens, on the data side and in the model."""

    layout: ClassVar[str] = "fuyu"
    canvas: int | tuple[int, int] = 0
    patch_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        canvas = self.canvas
        sides = [canvas, canvas] if isinstance(canvas, int) else list(canvas)
        for name, value in (("canvas", sides), ("patch_size", [self.patch_size])):
            if len(value) != (2 if name == "canvas" else 1) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value
            ):
                raise ValueError(
                    f"the fuyu layout needs a positive int {name}"
                    f"{' (or [height, width])' if name == 'canvas' else ''}, got {getattr(self, name)!r}"
                )
        if any(side % self.patch_size for side in sides):
            raise ValueError(f"canvas {canvas} is not a multiple of patch {self.patch_size}")
        object.__setattr__(self, "canvas", (sides[0], sides[1]))  # (height, width)

    @classmethod
    def from_model(cls, base: PromptFormat, model: ModelConfig) -> FuyuFormat:
        v = model.vision
        canvas = fuyu_canvas(model.image_layout.canvas, v.image_size)
        return cls(
            base.image_tokens, base.image_boundaries, base.chat_template, canvas, v.patch_size
        )

    def grid_for_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return fuyu_grid(size, self.canvas, self.patch_size)

    def slots_for_size(self, size: tuple[int, int]) -> int:
        rows, cols = self.grid_for_size(size)
        return rows * (cols + 1)

    def crops(self, image: Image.Image, high_res: bool = True) -> int:
        return 1

    def slots(self, image: Image.Image, high_res: bool = True) -> int:
        return self.slots_for_size(image.size)

    def pixel_values(
        self,
        processor: ImageProcessor,
        images: list[Image.Image],
        high_res: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """The canvases, rescaled and normalised by `processor`: the layout fits each image to
        the canvas itself, so whatever resizing, cropping or padding the processor would do
        (a run's CLIP or SigLIP square, Fuyu-8B's 1080 x 1920 `size`) is left out."""
        unsized = replace(
            processor, shortest_edge=None, size=None, crop_size=None, pad_to_square=False
        )
        return super().pixel_values(unsized, images, high_res)

    def crop(
        self, image: Image.Image, processor: ImageProcessor | None = None, high_res: bool = True
    ) -> list[Image.Image]:
        image = image.convert("RGB") if processor is None else processor.to_rgb(image)
        fitted = fuyu_fit(image.size, self.canvas)
        if fitted != image.size:  # Fuyu's processor resamples bilinearly
            image = image.resize(fitted, resample=Image.Resampling.BILINEAR)
        height, width = self.canvas
        canvas = Image.new("RGB", (width, height), (1, 1, 1))
        canvas.paste(image, (0, 0))
        return [canvas]
