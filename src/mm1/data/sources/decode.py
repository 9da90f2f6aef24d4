"""Decoding encoded image bytes to RGB: transparency onto white, a cap on decoded pixels, and
errors that say what the bytes are.

The cap (`data.max_image_pixels`) keeps a huge image (8000 x 8000) from being decoded in full
just to be resized to the encoder's few hundred pixels. Above the cap only, a JPEG is decoded at
1/2, 1/4 or 1/8 scale (PIL's `draft`, i.e. libjpeg's DCT scaling), and anything still above the
cap is reduced by an integer box filter; images under the cap are decoded exactly as PIL (and
transformers) decode them. Every decoded image carries its header's size in
`info["original_size"]`, so code that depends on the original size does not see the reduction.
"""

from __future__ import annotations

import io
import math

from PIL import Image

IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096

# Process-wide, like PIL's own `Image.MAX_IMAGE_PIXELS`: the loader sets it in each worker.
_max_pixels = DEFAULT_MAX_IMAGE_PIXELS


def set_max_image_pixels(n: int) -> None:
    """Cap on decoded pixels per image (0 = no cap)."""
    global _max_pixels
    if n < 0:
        raise ValueError(f"max_image_pixels={n} must be >= 0 (0 = no cap)")
    _max_pixels = int(n)


def max_image_pixels() -> int:
    return _max_pixels


def is_oversize(image: Image.Image) -> bool:
    """Whether `image` was decoded below its original size because of the cap."""
    return image.info.get("original_size", image.size) != image.size


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def _draft_factor(width: int, height: int, cap: int) -> int:
    """The smallest JPEG scale-down (1, 2, 4 or 8) that brings the image within `cap`."""
    for k in (1, 2, 4, 8):
        if math.ceil(width / k) * math.ceil(height / k) <= cap:
            return k
    return 8


def decode_image(data: bytes, name: str = "") -> Image.Image:
    """Decode encoded image bytes to an RGB image (transparent pixels composited on white),
    within the pixel cap. Raises OSError/ValueError/… for corrupt or truncated data; bytes that
    are no image raise an OSError naming `name` (a file or shard member), the format its
    extension promises and what the bytes look like."""
    cap = _max_pixels
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise OSError(describe_unidentified(data, name)) from None
    with opened as im:
        original = im.size
        if cap and original[0] * original[1] > cap and im.format in ("JPEG", "MPO"):
            k = _draft_factor(*original, cap)
            im.draft(im.mode, (math.ceil(original[0] / k), math.ceil(original[1] / k)))
        im.load()
        out = _to_rgb(im)
    if cap and out.width * out.height > cap:
        out = out.reduce(math.ceil(math.sqrt(out.width * out.height / cap)))
    out.info["original_size"] = original
    return out


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\x1f\x8b", "gzip data"),
    (b"PK\x03\x04", "a zip archive"),
    (b"%PDF", "PDF"),
)
_EXPECTED = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WebP", "gif": "GIF"}


def sniff_format(data: bytes) -> str:
    """What the first bytes of `data` look like, in words."""
    if not data:
        return "empty (0 bytes)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return f"HEIF/AVIF ({data[8:12].decode()}), which PIL cannot read without a plug-in"
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    if head.startswith((b"<?xml", b"<svg")):
        return "XML/SVG, not a raster image"
    return f"unknown (starts with {data[:8].hex(' ')})"


def describe_unidentified(data: bytes, name: str = "") -> str:
    """One line for bytes PIL cannot identify: which file, what was expected, what they are."""
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    expected = _EXPECTED.get(ext, "an image")
    where = f"{name}: " if name else ""
    return f"{where}not a readable image: expected {expected}, the bytes are {sniff_format(data)}"
