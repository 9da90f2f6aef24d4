"""Image preprocessing for the vision encoder.

`ImageProcessor` turns PIL images into the (N, 3, H, W) float32 pixel values the ViT expects. It
gives the same pixels as transformers' CLIP and SigLIP image processors with their PIL backend
(`CLIPImageProcessorPil` / `SiglipImageProcessorPil` in transformers 5, the "slow" processors of
transformers 4), because users compare encoders loaded from HF checkpoints against HF itself.
The steps and their exact arithmetic follow that backend:

1. RGB conversion; transparency is composited onto white (transformers 5's `convert_to_rgb`);
2. optional LLaVA expand-to-square: pad to a centred square with the mean colour;
3. resize with PIL: shortest edge to N (long edge `int(N * long / short)`, truncated) or exact (H, W);
4. centre crop on the uint8 array: offset `(size - crop) // 2`; a too-small image is zero-padded
   first, `ceil(missing / 2)` before;
5. rescale in float64 (`x * 1/255`), cast to float32;
6. normalise in float32: `(x - mean) / std`.

Only PIL, numpy and torch are used (no torchvision, no transformers). The tiling arithmetic of
the high-resolution layouts (`select_best_resolution`, LLaVA-NeXT's) lives in `mm1.tiling`,
shared with the model, and is importable from here.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mm1.fs import read_json
from mm1.tiling import select_best_resolution as select_best_resolution  # public here

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# `image_processor_type` (or the older `feature_extractor_type`) values we reproduce; the "Fast"
# (torchvision) and "Pil" variants read the same config, so one set of defaults serves all three.
_CLIP_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
_CLIP_TYPES += ("CLIPFeatureExtractor",)
# LLaVA's processors read CLIP's keys; LLaVA-1.5's `do_pad` is its expand-to-square (LLaVA-NeXT's
# `do_pad` pads a batch's crop counts, nothing of one image's pixels).
_LLAVA_TYPES = tuple(
    f"{k}{v}"
    for k in ("LlavaImageProcessor", "LlavaNextImageProcessor")
    for v in ("", "Fast", "Pil")
)
_SIGLIP_TYPES = ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")
# Fuyu's processor fits each image to its canvas itself: mm1's fuyu layout does that, so only
# its rescaling and normalisation are read.
_FUYU_TYPES = ("FuyuImageProcessor", "FuyuImageProcessorFast", "FuyuImageProcessorPil")


@dataclass(frozen=True)
class ImageProcessor:
    """Resize → centre crop → rescale → normalise, pixel-equal to transformers' PIL backend.

    Resize rule: `shortest_edge` (aspect kept, CLIP) or `size` = exact (H, W) (SigLIP), or neither
    (no resize). `crop_size` (H, W) or None. `rescale_factor` None skips rescaling; `image_mean` /
    `image_std` None skip normalisation. `resample` is a PIL code (3 = bicubic).
    `do_convert_rgb=False` still converts non-RGB images with PIL's plain `convert("RGB")` (alpha
    dropped, the transformers 4 behaviour), because the encoder needs three channels.
    """

    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = (224, 224)
    pad_to_square: bool = False
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] | None = OPENAI_CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if self.shortest_edge is not None and self.size is not None:
            raise ValueError("ImageProcessor: give shortest_edge or size (H, W), not both")
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("ImageProcessor: image_mean and image_std go together")
        for name in ("size", "crop_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (int(value[0]), int(value[1])))
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise ValueError(f"ImageProcessor: {name} needs 3 values, got {value}")
                object.__setattr__(self, name, tuple(float(v) for v in value))

    # -- presets and loading ---------------------------------------------------------------------

    @classmethod
    def clip(cls, size: int = 224, **overrides: Any) -> ImageProcessor:
        """OpenAI CLIP: shortest edge to `size`, centre crop `size`², CLIP mean/std."""
        base = cls(shortest_edge=size, crop_size=(size, size))
        return replace(base, **overrides)

    @classmethod
    def siglip(cls, size: int = 224, **overrides: Any) -> ImageProcessor:
        """SigLIP: exact resize to `size`², no crop, mean/std 0.5."""
        base = cls(
            shortest_edge=None,
            size=(size, size),
            crop_size=None,
            image_mean=SIGLIP_MEAN,
            image_std=SIGLIP_STD,
        )
        return replace(base, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ImageProcessor:
        """Read a checkpoint directory's (or the file's) `preprocessor_config.json`.

        Understands CLIPImageProcessor / SiglipImageProcessor configs (and their Fast / Pil
        variants, and the older CLIPFeatureExtractor). Missing keys take that class's defaults, as
        transformers does. `overrides` set fields afterwards (e.g. `pad_to_square=True` for LLaVA).
        """
        path = Path(path)
        file = path / PREPROCESSOR_CONFIG if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no {PREPROCESSOR_CONFIG} at {path}, so how the model's images are resized "
                "and normalised is unknown: export the model again (`mm1 convert RUN --export "
                "DIR` writes one), or copy it in from the run's tokenizer/ folder"
            )
        cfg = read_json(file)
        kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
        if kind in _CLIP_TYPES or kind in _LLAVA_TYPES:
            base = cls.clip(224)
        elif kind in _SIGLIP_TYPES:
            base = cls.siglip(224)
        elif kind in _FUYU_TYPES:
            base = replace(cls.siglip(224), size=None)
        else:
            raise ValueError(
                f"{file}: unsupported image_processor_type {kind!r}; supported: "
                f"{', '.join(_CLIP_TYPES + _LLAVA_TYPES + _SIGLIP_TYPES + _FUYU_TYPES)}"
            )

        resize: dict[str, Any] = {}
        if kind in _FUYU_TYPES or cfg.get("do_resize", True) is False:
            resize = {"shortest_edge": None, "size": None}
        elif cfg.get("size") is not None:
            resize = _parse_size(cfg["size"], bool(cfg.get("default_to_square", False)), file)
        crop = base.crop_size
        if "do_center_crop" in cfg and not cfg["do_center_crop"]:
            crop = None
        elif cfg.get("crop_size") is not None:
            crop_dict = _parse_size(cfg["crop_size"], True, file)
            crop = crop_dict.get("size")
            if crop is None:
                raise ValueError(
                    f"{file}: crop_size must give height and width: {cfg['crop_size']}"
                )
        elif cfg.get("do_center_crop") and crop is None:
            raise ValueError(f"{file}: do_center_crop is true but there is no crop_size")

        mean, std = base.image_mean, base.image_std
        if cfg.get("do_normalize", True) is False:
            mean = std = None
        else:
            mean = _three(cfg.get("image_mean", mean))
            std = _three(cfg.get("image_std", std))
        rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else None
        proc = replace(
            base,
            **resize,
            crop_size=crop,
            rescale_factor=rescale,
            image_mean=mean,
            image_std=std,
            resample=int(cfg.get("resample", base.resample)),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
            pad_to_square=bool(
                cfg.get("pad_to_square", False)
                or (str(kind).startswith("LlavaImageProcessor") and cfg.get("do_pad", False))
            ),
        )
        return replace(proc, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a `preprocessor_config.json` that `from_pretrained` (and transformers' PIL
        CLIP processor, apart from `pad_to_square`, which it ignores) read back identically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.shortest_edge is not None:
            size: dict[str, int] | None = {"shortest_edge": self.shortest_edge}
        elif self.size is not None:
            size = {"height": self.size[0], "width": self.size[1]}
        else:
            size = None
        cfg = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": size is not None,
            "size": size,
            "do_center_crop": self.crop_size is not None,
            "crop_size": (
                {"height": self.crop_size[0], "width": self.crop_size[1]}
                if self.crop_size
                else None
            ),
            "do_rescale": self.rescale_factor is not None,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.image_mean is not None,
            "image_mean": list(self.image_mean) if self.image_mean else None,
            "image_std": list(self.image_std) if self.image_std else None,
            "resample": self.resample,
            "do_convert_rgb": self.do_convert_rgb,
            "pad_to_square": self.pad_to_square,
        }
        path = directory / PREPROCESSOR_CONFIG
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        return path

    # -- processing ------------------------------------------------------------------------------

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output image, or None when it depends on the input's aspect ratio."""
        return self.crop_size or self.size

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocess a list of images into one (N, 3, H, W) float32 tensor."""
        arrays = [self.preprocess(im) for im in images]
        if not arrays:
            h, w = self.output_size or (0, 0)
            return torch.zeros(0, 3, h, w)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"images came out with different shapes {sorted(shapes)}; set crop_size or an "
                "exact size to batch them"
            )
        return torch.from_numpy(np.stack(arrays))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One image → (3, H, W) float32 array."""
        pixels = self.resized_pixels(image)
        # Each output value depends only on its channel and uint8 input value: look it up.
        table = _value_table(self.rescale_factor, self.image_mean, self.image_std)
        return table[_CHANNELS, np.ascontiguousarray(pixels)]

    def resized_pixels(self, image: Image.Image) -> np.ndarray:
        """One image → (3, H, W) uint8 after RGB conversion, squaring, resize and crop."""
        image = self.to_rgb(image)
        if self.pad_to_square:
            image = self._expand_to_square(image)
        if self.shortest_edge is not None or self.size is not None:
            h, w = self.resize_output_size(image.height, image.width)
            # PIL takes (width, height); reducing_gap stays None as in transformers.
            image = image.resize((w, h), resample=self.resample)
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # CHW, like transformers
        if self.crop_size is not None:
            pixels = _center_crop(pixels, self.crop_size)
        return pixels

    def unnormalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) processed pixels back to [0, 1] intensities (clamped): the inverse of
        the rescale and the normalisation, for showing or scoring a decoded image."""
        x = pixels.float()
        if self.image_mean is not None and self.image_std is not None:
            shape = (3, 1, 1)
            std = torch.tensor(self.image_std, device=x.device).reshape(shape)
            x = x * std + torch.tensor(self.image_mean, device=x.device).reshape(shape)
        return (x / (255 * (self.rescale_factor or 1.0))).clamp(0, 1)

    def scaled(self, factor: int) -> ImageProcessor:
        """The same processing at `factor` times the output size (MM1's high-resolution view)."""
        return replace(
            self,
            shortest_edge=self.shortest_edge * factor if self.shortest_edge else None,
            size=(self.size[0] * factor, self.size[1] * factor) if self.size else None,
            crop_size=(
                (self.crop_size[0] * factor, self.crop_size[1] * factor) if self.crop_size else None
            ),
        )

    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after resizing an image of (height, width)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        # transformers (after torchvision): the long edge is truncated, not rounded, and always
        # recomputed even when the short edge already matches.
        new_long = int(self.shortest_edge * long / short)
        if width <= height:
            return new_long, self.shortest_edge
        return self.shortest_edge, new_long

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """Three channels, transparency onto white (see the class)."""
        if not self.do_convert_rgb:
            return image if image.mode == "RGB" else image.convert("RGB")
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if not has_alpha:
            return image if image.mode == "RGB" else image.convert("RGB")
        # Transparent pixels become white, not whatever colour hides under alpha 0.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")

    def _expand_to_square(self, image: Image.Image) -> Image.Image:
        # LLaVA pads with the mean colour (int(m * 255)), which normalises to ~0.
        width, height = image.size
        if width == height:
            return image
        mean = self.image_mean or (0.0, 0.0, 0.0)
        fill = tuple(int(m * 255) for m in mean)
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas


_CHANNELS = np.arange(3)[:, None, None]


@functools.lru_cache(maxsize=16)
def _value_table(
    rescale_factor: float | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> np.ndarray:
    """(3, 256) float32: the rescaled and normalised value of every uint8 value per channel,
    computed with transformers' exact operations and dtypes (so lookups are bit-identical)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    if rescale_factor is not None:
        # float64 product, then float32: transformers' `rescale` does exactly this.
        out = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        out = values.astype(np.float32)
    if mean is not None and std is not None:
        m = np.asarray(mean, dtype=np.float32)[:, None]
        sd = np.asarray(std, dtype=np.float32)[:, None]
        out = (out - m) / sd  # float32 throughout, as transformers' `normalize`
    return np.ascontiguousarray(out, dtype=np.float32)


def _center_crop(pixels: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Centre crop a (C, H, W) array; zero-pad first where the image is smaller than the crop."""
    crop_h, crop_w = crop
    _, h, w = pixels.shape
    if crop_h > h or crop_w > w:
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        top, left = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
        pixels = np.pad(pixels, ((0, 0), (top, pad_h - top), (left, pad_w - left)))
        _, h, w = pixels.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return pixels[:, top : top + crop_h, left : left + crop_w]


def _parse_size(value: Any, default_to_square: bool, file: Path) -> dict[str, Any]:
    """A preprocessor_config size (int, [h, w] or dict) → ImageProcessor resize fields."""
    if isinstance(value, int):
        # transformers 5: an int is the shortest edge unless the class defaults to squares.
        if default_to_square:
            return {"shortest_edge": None, "size": (value, value)}
        return {"shortest_edge": value, "size": None}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"shortest_edge": None, "size": (int(value[0]), int(value[1]))}
    if isinstance(value, dict):
        keys = {k for k, v in value.items() if v is not None}
        if keys == {"shortest_edge"}:
            return {"shortest_edge": int(value["shortest_edge"]), "size": None}
        if keys == {"height", "width"}:
            return {"shortest_edge": None, "size": (int(value["height"]), int(value["width"]))}
    raise ValueError(
        f"{file}: unsupported size {value!r}; expected {{'shortest_edge': N}} or "
        "{'height': H, 'width': W}"
    )


def _three(value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)
