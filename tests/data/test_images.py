"""ImageProcessor gives the same pixels as transformers' CLIP / SigLIP processors (PIL backend)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm1.data.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    ImageProcessor,
)

CLIP_MEAN, CLIP_STD = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
HALF = [0.5, 0.5, 0.5]

# preprocessor_config.json files as checkpoints ship them (dict sizes of transformers >= 4.2x,
# the int sizes + feature_extractor_type of openai/clip-vit-large-patch14-336).
CONFIGS = {
    "clip224": {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "do_convert_rgb": True,
    },
    "clip336_legacy": {
        "feature_extractor_type": "CLIPFeatureExtractor",
        "size": 336,
        "crop_size": 336,
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
    },
    # The crop is larger than the resize, and not square: exercises the zero padding and the
    # floor / ceil offsets of the centre crop; bilinear resampling.
    "clip_pad_crop": {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 61},
        "crop_size": {"height": 67, "width": 58},
        "resample": 2,
    },
    "siglip224": {
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": HALF,
        "image_std": HALF,
        "resample": 3,
    },
    "siglip384": {
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": 384, "width": 384},
        "image_mean": HALF,
        "image_std": HALF,
        "resample": 3,
    },
    # Not square, no rescale (normalise raw 0..255 values).
    "siglip_rect_norescale": {
        "image_processor_type": "SiglipImageProcessorPil",
        "size": {"height": 40, "width": 72},
        "do_rescale": False,
        "image_mean": [100.0, 120.0, 130.0],
        "image_std": [50.0, 60.0, 70.0],
    },
}


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)

    def noise(h: int, w: int, c: int) -> np.ndarray:
        # Noise plus a gradient, so both high-frequency and smooth content get resampled.
        grad = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, c))
        return ((rng.integers(0, 256, (h, w, c)) + grad) / 2).astype(np.uint8)

    images = [
        Image.fromarray(noise(h, w, 3))
        for h, w in [(480, 640), (333, 500), (501, 37), (100, 150), (224, 224), (225, 223)]
    ]
    images.append(Image.fromarray(noise(17, 29, 3)))  # smaller than every target
    rgba = noise(120, 90, 4)
    rgba[..., 3] = np.linspace(0, 255, 90).astype(np.uint8)[None, :]  # alpha ramp, 0 included
    images.append(Image.fromarray(rgba, "RGBA"))
    images.append(Image.fromarray(noise(90, 130, 1)[..., 0], "L"))
    pal = Image.fromarray(noise(60, 80, 3)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0  # palette image with a transparent index
    images.append(pal)
    return images


def _write(tmp_path: Path, name: str, cfg: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_pixels_as_transformers_pil_backend(tmp_path: Path, name: str) -> None:
    transformers = pytest.importorskip("transformers")
    path = _write(tmp_path, name, CONFIGS[name])
    hf = transformers.AutoImageProcessor.from_pretrained(str(path), backend="pil")
    assert type(hf).__name__.endswith("ImageProcessorPil")  # the PIL backend, not torchvision
    ours = ImageProcessor.from_pretrained(path)
    images = _images()
    expected = hf(images, return_tensors="pt")["pixel_values"]
    got = ours(images)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=0)


def test_presets_match_checkpoint_configs(tmp_path: Path) -> None:
    clip = ImageProcessor.from_pretrained(_write(tmp_path, "c", CONFIGS["clip336_legacy"]))
    assert clip == ImageProcessor.clip(336)
    assert clip.output_size == (336, 336)
    siglip = ImageProcessor.from_pretrained(_write(tmp_path, "s", CONFIGS["siglip384"]))
    assert siglip == ImageProcessor.siglip(384)
    assert siglip.crop_size is None and siglip.size == (384, 384)
    assert ImageProcessor.siglip(224).image_mean == SIGLIP_MEAN


def test_from_pretrained_fields_and_overrides(tmp_path: Path) -> None:
    cfg = {**CONFIGS["clip224"], "do_center_crop": False, "do_normalize": False, "resample": 2}
    proc = ImageProcessor.from_pretrained(_write(tmp_path, "p", cfg), pad_to_square=True)
    assert proc.shortest_edge == 224 and proc.size is None and proc.crop_size is None
    assert proc.image_mean is None and proc.image_std is None
    assert proc.resample == 2 and proc.pad_to_square
    assert proc.to_dict()["rescale_factor"] == pytest.approx(1 / 255)
    # A file path works as well as its directory.
    file = tmp_path / "p" / "preprocessor_config.json"
    assert ImageProcessor.from_pretrained(file) == ImageProcessor.from_pretrained(file.parent)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        ImageProcessor.from_pretrained(tmp_path)
    bad = _write(tmp_path, "vit", {"image_processor_type": "ViTImageProcessor"})
    with pytest.raises(ValueError, match="ViTImageProcessor"):
        ImageProcessor.from_pretrained(bad)
    none = _write(tmp_path, "none", {"size": 224})
    with pytest.raises(ValueError, match="None"):
        ImageProcessor.from_pretrained(none)
    odd = _write(tmp_path, "odd", {**CONFIGS["clip224"], "size": {"longest_edge": 224}})
    with pytest.raises(ValueError, match="longest_edge"):
        ImageProcessor.from_pretrained(odd)


def test_pad_to_square_uses_mean_colour() -> None:
    proc = ImageProcessor.clip(32, pad_to_square=True)
    wide = Image.fromarray(np.full((10, 40, 3), 255, np.uint8))
    out = proc([wide])[0]
    # The padding rows (top and bottom) hold int(mean * 255), which normalises to about 0.
    assert out[:, 0].abs().max() < 1 / 255 / min(OPENAI_CLIP_STD) + 1e-6
    assert out[:, 16].min() > 1.5  # the white strip in the middle
    # Same as padding by hand (LLaVA's expand2square), then processing without padding.
    canvas = Image.new("RGB", (40, 40), tuple(int(m * 255) for m in OPENAI_CLIP_MEAN))
    canvas.paste(wide, (0, 15))
    torch.testing.assert_close(out, ImageProcessor.clip(32)([canvas])[0], rtol=0, atol=0)


def test_batching_rules() -> None:
    proc = ImageProcessor(shortest_edge=8, crop_size=None)
    a = Image.new("RGB", (8, 8))
    b = Image.new("RGB", (16, 8))
    assert proc([a]).shape == (1, 3, 8, 8)
    assert proc([b]).shape == (1, 3, 8, 16)
    with pytest.raises(ValueError, match="different shapes"):
        proc([a, b])
    assert ImageProcessor.siglip(16)([]).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="not both"):
        ImageProcessor(shortest_edge=8, size=(8, 8))


def test_resize_arithmetic_truncates_long_edge() -> None:
    proc = ImageProcessor.clip(224)
    # 224 * 500 / 333 = 336.33 -> 336; 224 * 641 / 480 = 299.13 -> 299 (never rounded up).
    assert proc.resize_output_size(333, 500) == (224, 336)
    assert proc.resize_output_size(641, 480) == (299, 224)
    assert proc.resize_output_size(3, 3) == (224, 224)
