"""Layout behaviour the layout tests left unpinned (found by mutation testing): the refusals of
bad settings, `from_layout` carrying every option, the processor's resampling and RGB conversion
used for every resize, and the defaults."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mm1.config import ImageLayoutConfig
from mm1.data.images import ImageProcessor
from mm1.data.layouts import AnyresFormat, DynamicFormat, MM1Format
from mm1.data.prompt_format import PromptFormat

CROP = 32


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _rgba(width: int, height: int, seed: int = 0) -> Image.Image:
    image = _noise(width, height, seed)
    rng = np.random.default_rng(seed + 1)
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
    image.putalpha(Image.fromarray(alpha))
    return image


@pytest.mark.parametrize("cls", [MM1Format, AnyresFormat, DynamicFormat])
@pytest.mark.parametrize(
    ("crop_size", "message"),
    [
        (True, "crop_size must be an int"),
        (32.0, "crop_size must be an int"),
        (0, "needs crop_size"),
    ],
)
def test_a_bad_crop_size_is_refused(cls, crop_size, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(4, crop_size=crop_size)


@pytest.mark.parametrize("cls", [MM1Format, AnyresFormat, DynamicFormat])
def test_cutting_needs_the_image_processor(cls) -> None:
    fmt = cls(4, crop_size=CROP)
    image = _noise(50, 40)
    with pytest.raises(ValueError, match="cuts crops with the image processor"):
        fmt.crop(image)
    assert fmt.crop(image, high_res=False) == [image]


def test_a_processor_of_another_size_is_refused() -> None:
    # mm1 cuts the processor's own views (anyres and dynamic resize to the crop size).
    fmt = MM1Format(4, crop_size=CROP)
    with pytest.raises(ValueError, match=f"whose output is {CROP} px square"):
        fmt.crop(_noise(70, 50), ImageProcessor.clip(CROP // 2))


@pytest.mark.parametrize("canvas", [[32, 48], [48, 32], [0, 32], [32, 0], [16, 32], [32, 16]])
def test_an_anyres_canvas_that_is_not_a_grid_of_crops_is_refused(canvas) -> None:
    with pytest.raises(ValueError, match="is not a grid of 32 px crops"):
        AnyresFormat(4, crop_size=CROP, pinpoints=[[64, 32], canvas])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_tiles": 0}, "need 1 <= min_tiles"),
        ({"min_tiles": 5, "max_tiles": 3}, "need 1 <= min_tiles"),
        ({"overview": "middle"}, "overview must be 'first' or 'last'"),
    ],
)
def test_bad_dynamic_settings_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DynamicFormat(4, crop_size=CROP, **options)


def test_from_layout_carries_every_option() -> None:
    base = PromptFormat(4, image_boundaries=True)
    layout = ImageLayoutConfig(type="dynamic", min_tiles=2, max_tiles=5, overview="first")
    fmt = DynamicFormat.from_layout(base, layout, CROP)
    assert fmt == DynamicFormat(4, True, crop_size=CROP, min_tiles=2, max_tiles=5, overview="first")
    pinned = ImageLayoutConfig(type="anyres", pinpoints=[[64, 32], [32, 64]])
    assert AnyresFormat.from_layout(base, pinned, CROP).pinpoints == [[64, 32], [32, 64]]
    gridded = ImageLayoutConfig(type="anyres", grid=[1, 3])
    assert AnyresFormat.from_layout(base, gridded, CROP).grid == [1, 3]


def test_dynamic_defaults_are_the_configs() -> None:
    fmt, layout = DynamicFormat(4, crop_size=CROP), ImageLayoutConfig()
    assert (fmt.min_tiles, fmt.max_tiles, fmt.overview) == (
        layout.min_tiles,
        layout.max_tiles,
        layout.overview,
    )


def test_every_resize_uses_the_processors_resampling() -> None:
    processor = ImageProcessor.clip(CROP, resample=int(Image.Resampling.NEAREST))
    near = Image.Resampling.NEAREST
    image = _noise(77, 45, seed=3)
    dyn = DynamicFormat(4, crop_size=CROP, max_tiles=2).crop(image, processor)  # 2 x 1 tiles
    assert len(dyn) == 3
    assert np.array_equal(np.asarray(dyn[-1]), np.asarray(image.resize((CROP, CROP), near)))
    tiles = np.asarray(image.resize((2 * CROP, CROP), near))
    assert np.array_equal(np.asarray(dyn[0]), tiles[:, :CROP])
    anyres = AnyresFormat(4, crop_size=CROP).crop(image, processor)
    assert np.array_equal(np.asarray(anyres[0]), np.asarray(image.resize((CROP, CROP), near)))


@pytest.mark.parametrize("cls", [AnyresFormat, DynamicFormat])
def test_transparent_images_are_cut_after_rgb_conversion(cls) -> None:
    # Transparency onto white first, as the processor does, then the resizes.
    processor = ImageProcessor.clip(CROP)
    fmt = cls(4, crop_size=CROP)
    image = _rgba(90, 40, seed=5)
    pieces = fmt.crop(image, processor)
    expected = fmt.crop(processor.to_rgb(image), processor)
    assert len(pieces) == len(expected) > 1
    for got, want in zip(pieces, expected):
        assert got.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(want))
