"""Evaluation images, decoded and preprocessed once: caches by path (a tiled layout's crops by
path and form), and the one error an undecodable evaluation image raises."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources.base import IMAGE_ERRORS, DataError


class EvalImageError(DataError):
    """An image of an evaluation task cannot be decoded; the message names the file."""

    def __init__(self, path: Path, err: BaseException) -> None:
        self.path, self.detail = path, f"{type(err).__name__}: {err}"
        super().__init__(
            f"{path}: cannot decode this evaluation image ({self.detail}); replace the file, or "
            "score the queries that show it as empty predictions (`mm1 eval --bad-images empty`)"
        )


class PixelCache:
    """Preprocessed images by path, least recently used dropped first."""

    def __init__(self, processor: ImageProcessor, size: int = 512) -> None:
        self.processor, self.size = processor, size
        self._items: OrderedDict[Path, torch.Tensor] = OrderedDict()

    def __call__(self, path: Path) -> torch.Tensor:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        try:
            with Image.open(path) as im:
                im.load()
                pixels = self.processor([im])[0]
        except IMAGE_ERRORS as err:  # PIL names no file (e.g. "Truncated File Read")
            raise EvalImageError(path, err) from None
        self._items[path] = pixels
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return pixels


class CropCache:
    """A tiled layout's crops of an image (and its (height, width)) by path and form (tiled or
    `single`), least recently used dropped first."""

    def __init__(self, processor: ImageProcessor, fmt: PromptFormat, size: int = 256) -> None:
        self.processor, self.fmt, self.size = processor, fmt, size
        self._items: OrderedDict[tuple[Path, bool], tuple[torch.Tensor, tuple[int, int]]]
        self._items = OrderedDict()

    def __call__(self, path: Path, high_res: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        key = (path, high_res)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        try:
            with Image.open(path) as im:
                im.load()
                item = (
                    self.fmt.pixel_values(self.processor, [im], [high_res]),
                    (im.height, im.width),
                )
        except IMAGE_ERRORS as err:
            raise EvalImageError(path, err) from None
        self._items[key] = item
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return item
