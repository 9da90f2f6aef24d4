"""Tiling arithmetic for high-resolution image layouts, shared by the data side (how many crops
and tokens an image becomes) and the model (how crop features are assembled), so the two cannot
disagree. Pure integer arithmetic on sizes; no images, no tensors.

Sizes here are (width, height) unless a name says `_hw`. The LLaVA-NeXT ("anyres") rules are
transformers' to the pixel and the token: `select_best_resolution`, the aspect-preserving resize
(`get_patch_output_size`), the centred pad (`divmod(missing, 2)`, the extra pixel after), and
the unpadding of the feature grid (`unpad_image` / the processor's `_get_unpadded_features`).
The `dynamic` grid choice is InternVL's `find_closest_aspect_ratio`, tie rule included. The
`fuyu` canvas is transformers' Fuyu processor's: shrink to fit (never enlarge), pad right and below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size = tuple[int, int]  # (width, height)

# LLaVA-NeXT v1.6's canvases in crop units, in transformers' order, as (width, height).
LLAVA_NEXT_CANVASES: tuple[Size, ...] = ((2, 1), (1, 2), (2, 2), (1, 3), (3, 1))


def select_best_resolution(original_size: Size, candidates: Sequence[Sequence[int]]) -> Size:
    """The candidate canvas (width, height) that keeps the most of an image of `original_size`
    (width, height) after an aspect-preserving resize, then wastes the least; the first of
    equal candidates wins. Truncates the resized size to integers, as transformers does."""
    width, height = int(original_size[0]), int(original_size[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size {original_size} must be positive")
    best: Size | None = None
    best_effective, best_wasted = 0, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        kept_w, kept_h = int(width * scale), int(height * scale)
        effective = min(kept_w * kept_h, width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_w), int(cand_h)), effective, wasted
    if best is None:
        raise ValueError("select_best_resolution: no candidate resolution")
    return best


def fit_size(original_size: Size, canvas: Size) -> Size:
    """(width, height) of the aspect-preserving resize of `original_size` into `canvas`: the
    tighter side fills the canvas, the other is `ceil`ed and capped (transformers'
    `get_patch_output_size`)."""
    width, height = original_size
    canvas_w, canvas_h = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return canvas_w, min(math.ceil(height * scale_w), canvas_h)
    return min(math.ceil(width * scale_h), canvas_w), canvas_h


def pad_offset(size: Size, canvas: Size) -> Size:
    """(left, top) of an image of `size` centred on `canvas`; an odd remainder goes after."""
    return (canvas[0] - size[0]) // 2, (canvas[1] - size[1]) // 2


def unpadded_rows_cols(original_size: Size, rows: int, cols: int) -> tuple[int, int, int, int]:
    """The part of a (rows, cols) feature grid that shows the image, not the pad: (first row,
    end row, first col, end col). transformers' `unpad_image` arithmetic (a rounded length,
    the padding split evenly, floor on each side)."""
    width, height = original_size
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


def canvas_candidates(
    crop: int, pinpoints: Sequence[Sequence[int]] | None, grid: Sequence[int] | None
) -> list[Size]:
    """The anyres canvases (width, height) in px: `pinpoints` as given, else every (i, j) crops
    with i, j in the `grid` range [lo, hi] (LLaVA's order: width outer), else LLaVA-NeXT v1.6's
    five canvases at this crop size."""
    if pinpoints:
        return [(int(w), int(h)) for w, h in pinpoints]
    if grid:
        lo, hi = int(grid[0]), int(grid[1])
        return [(i * crop, j * crop) for i in range(lo, hi + 1) for j in range(lo, hi + 1)]
    return [(w * crop, h * crop) for w, h in LLAVA_NEXT_CANVASES]


def anyres_grid(original_size: Size, crop: int, candidates: Sequence[Size]) -> tuple[int, int]:
    """(rows, cols) of crop-size tiles of the canvas an image of `original_size` is fitted to."""
    canvas_w, canvas_h = select_best_resolution(original_size, candidates)
    return canvas_h // crop, canvas_w // crop


def anyres_tokens(original_size: Size, rows: int, cols: int, side: int) -> int:
    """Image tokens of an anyres image: the base crop's side² tokens, then its (rows x cols)
    tiles' features as one grid, unpadded, with one newline token after each row."""
    r0, r1, c0, c1 = unpadded_rows_cols(original_size, rows * side, cols * side)
    return side * side + (r1 - r0) * (c1 - c0 + 1)


def dynamic_grid(original_size: Size, min_tiles: int, max_tiles: int, crop: int) -> tuple[int, int]:
    """(rows, cols) of the `dynamic` layout: of the grids with min..max tiles, the one whose
    aspect ratio is closest to the image's; on a tie the later (larger) grid wins when the
    image's area exceeds half of that grid's pixels (InternVL's `find_closest_aspect_ratio`)."""
    width, height = original_size
    aspect = width / height
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    # InternVL's order: by area, equal areas in the set's iteration order (deterministic for
    # tuples of small ints), which the tie rule below depends on.
    best_diff, best = math.inf, (1, 1)
    for cols, rows in sorted(grids, key=lambda g: g[0] * g[1]):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * crop * crop * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def fuyu_canvas(canvas: Sequence[int] | None, image_size: int) -> tuple[int, int]:
    """(height, width) px of Fuyu's canvas: `model.image_layout.canvas` ([height, width]), else
    the `model.vision.image_size` square."""
    if canvas is None:
        return image_size, image_size
    height, width = canvas
    return int(height), int(width)


def fuyu_fit(original_size: Size, canvas: int | tuple[int, int]) -> Size:
    """(width, height) of an image of `original_size` on Fuyu's canvas ((height, width) px, or
    one side of a square): unchanged when it fits, else shrunk to fit with its aspect kept, each
    side truncated (transformers' `FuyuImageProcessor.resize`), but never below 1 px
    (transformers would make a 1 x 1000 image 0 px wide on a 32 px canvas)."""
    ch, cw = (canvas, canvas) if isinstance(canvas, int) else canvas
    width, height = int(original_size[0]), int(original_size[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size {original_size} must be positive")
    if width <= cw and height <= ch:
        return width, height
    scale = min(ch / height, cw / width)
    return max(1, int(width * scale)), max(1, int(height * scale))


def fuyu_grid(original_size: Size, canvas: int | tuple[int, int], patch: int) -> tuple[int, int]:
    """(rows, cols) of the patches that cover an image of `original_size` on Fuyu's canvas (a
    patch partly over the padding counts; the patches wholly over it are left out)."""
    width, height = fuyu_fit(original_size, canvas)
    return math.ceil(height / patch), math.ceil(width / patch)
