"""Tiling arithmetic the layout tests left unpinned (found by mutation testing): LLaVA-NeXT's
canvases and their order, the integer rules of `select_best_resolution` and `unpad_image` on the
sizes where they matter, InternVL's tie boundary, and the refusals."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from mm1.tiling import (
    anyres_grid,
    canvas_candidates,
    dynamic_grid,
    select_best_resolution,
    unpadded_rows_cols,
)

transformers = pytest.importorskip("transformers")
llava_next_modeling = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
from transformers.image_processing_utils import select_best_resolution as hf_best  # noqa: E402

CROP = 32


def _hf_wh(size: tuple[int, int], canvases: list[tuple[int, int]]) -> tuple[int, int]:
    """transformers' choice for (width, height) sizes and canvases (it takes (h, w) pairs)."""
    h, w = hf_best((size[1], size[0]), [(ch, cw) for cw, ch in canvases])
    return w, h


def test_default_canvases_are_llava_next_v1_6_in_its_order() -> None:
    pinpoints_hw = transformers.LlavaNextConfig().image_grid_pinpoints
    assert canvas_candidates(336, None, None) == [(w, h) for h, w in pinpoints_hw]
    assert canvas_candidates(336, [], None) == canvas_candidates(336, None, None)


@pytest.mark.parametrize("size", [(10, 10), (300, 300), (1, 1), (200, 199)])
def test_small_square_images_pick_transformers_canvas_and_grid(size) -> None:
    # (1, 2) and (2, 1) crops tie for a small square image: the first in LLaVA-NeXT's order wins.
    pinpoints_hw = transformers.LlavaNextConfig().image_grid_pinpoints
    canvases = canvas_candidates(336, None, None)
    assert select_best_resolution(size, canvases) == _hf_wh(size, canvases)
    w, h = size
    expected = llava_next_modeling.get_anyres_image_grid_shape((h, w), pinpoints_hw, 336)
    assert anyres_grid(size, 336, canvases) == tuple(expected)


def test_grid_canvases_are_every_pair_in_the_range_width_outer() -> None:
    c = CROP
    assert canvas_candidates(c, None, [1, 2]) == [(c, c), (c, 2 * c), (2 * c, c), (2 * c, 2 * c)]
    assert canvas_candidates(c, None, [2, 3]) == [
        (2 * c, 2 * c),
        (2 * c, 3 * c),
        (3 * c, 2 * c),
        (3 * c, 3 * c),
    ]
    assert canvas_candidates(c, [[64, 32]], [1, 3]) == [(64, 32)]  # pinpoints win


@pytest.mark.parametrize("size", [(97, 1), (99, 1), (100, 1), (99, 49)])
def test_the_resized_size_is_truncated_as_transformers_does(size) -> None:
    # Rounding instead of truncating would pick (96, 32) for these.
    canvases = [(32, 64), (64, 32), (64, 64), (96, 32), (32, 96)]
    assert select_best_resolution(size, canvases) == _hf_wh(size, canvases)


@pytest.mark.parametrize(
    ("size", "rows", "cols"),
    [((44, 55), 48, 24), ((47, 47), 48, 24), ((49, 49), 16, 8), ((88, 55), 24, 24)],
)
def test_unpadding_rounds_like_unpad_image(size, rows: int, cols: int) -> None:
    # height * cols / width is a hair under an integer here: transformers rounds to 7 digits.
    grid = torch.arange(rows * cols).reshape(1, rows, cols)
    r0, r1, c0, c1 = unpadded_rows_cols(size, rows, cols)
    expected = llava_next_modeling.unpad_image(grid, (size[1], size[0]))
    assert torch.equal(grid[:, r0:r1, c0:c1], expected)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-3, 5)])
def test_a_size_without_area_is_refused(size) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        select_best_resolution(size, [(32, 32)])


def test_no_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match="no candidate resolution"):
        select_best_resolution((10, 10), [])


def _find_closest_aspect_ratio():
    """InternVL's `find_closest_aspect_ratio`, as lmms-eval ships it (read out of the file:
    the module imports torchvision)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        pytest.skip("lmms-eval is not installed")
    path = Path(spec.origin).parent / "models" / "simple" / "internvideo2_5.py"
    tree = ast.parse(path.read_text())
    module = ast.Module(
        [n for n in tree.body if getattr(n, "name", "") == "find_closest_aspect_ratio"], []
    )
    namespace: dict = {}
    exec(compile(module, str(path), "exec"), namespace)
    return namespace["find_closest_aspect_ratio"]


@pytest.mark.parametrize("size", [(64, 72), (72, 64), (64, 64), (32, 36)])
@pytest.mark.parametrize(("min_tiles", "max_tiles"), [(1, 9), (1, 12), (1, 6)])
def test_dynamic_tie_needs_more_than_half_the_grid(size, min_tiles: int, max_tiles: int) -> None:
    # 64 x 72 px is exactly half of a 3 x 3 grid of 32 px tiles: the tie keeps the 2 x 2 grid.
    find = _find_closest_aspect_ratio()
    w, h = size
    ratios = sorted(
        {
            (i, j)
            for n in range(min_tiles, max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_tiles <= i * j <= max_tiles
        },
        key=lambda x: x[0] * x[1],
    )
    cols, rows = find(w / h, ratios, w, h, CROP)
    assert dynamic_grid(size, min_tiles, max_tiles, CROP) == (rows, cols)
    if size == (64, 72) and max_tiles >= 9:
        assert (rows, cols) == (2, 2)
