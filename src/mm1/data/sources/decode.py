"""Decoding encoded image bytes to RGB: transparency onto white, a cap on decoded pixels, and
errors that say what the bytes are.

The cap (`data.max_image_pixels`) keeps a huge image (8000 x 8000) from being decoded in full
just to be resized to the encoder's few hundred pixels. Above the cap only, a JPEG is decoded at
1/2, 1/4 or 1/8 scale (PIL's `draft`, i.e. libjpeg's DCT scaling), and anything still above the
cap is reduced by an integer box filter; images under the cap are decoded exactly as PIL (and
transformers) decode them. Every decoded image carries its header's size in
`info["original_size"]`, so code that depends on the original size does not see the reduction.

A format that cannot be drafted (PNG, WebP, GIF, ...) is decoded in full before it is reduced,
so a few hundred kB of PNG can claim gigabytes: such an image whose header declares more than
`OVERSIZE_FACTOR` times the cap (never less than that times the default cap: 64 Mpx, 8192 x 8192)
is refused, from its header, with `OversizeImage`. A caller with its own limit (the server)
passes `max_pixels`, which refuses any format over it.

Images with more than 8 bits per sample (16-bit PNG/TIFF, 32-bit int or float TIFF) are scaled
to 8 bits (`_to_8bit`), not clipped as PIL's `convert` clips them.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Undraftable images over this many times the cap are refused: a 4x image still reduces (by 2),
# and at the default cap 64 Mpx bounds one decode to ~0.4 GB peak (RGB; ~1 GB RGBA), measured.
OVERSIZE_FACTOR = 4
_DRAFTABLE = ("JPEG", "MPO")

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


class OversizeImage(ValueError):
    """An image whose header declares more pixels than may be decoded (refused unread)."""

    def __init__(self, size: tuple[int, int], limit: int, name: str = "") -> None:
        where = f"{name}: " if name else ""
        super().__init__(
            f"{where}the image is {size[0]}x{size[1]} ({size[0] * size[1]} pixels), over the "
            f"{limit}-pixel limit on decoded images"
        )
        self.size, self.limit = size, limit


def reader_pixel_limit(image_format: str | None = None) -> int:
    """The most pixels the readers decode an image of `image_format` with (0 = no limit): none
    for drafted JPEGs or with no cap, else `OVERSIZE_FACTOR` x the cap, floored at the default
    cap's, so a small cap chosen for speed does not start refusing ordinary screenshots."""
    if not _max_pixels or image_format in _DRAFTABLE:
        return 0
    return OVERSIZE_FACTOR * max(_max_pixels, DEFAULT_MAX_IMAGE_PIXELS)


def is_oversize(image: Image.Image) -> bool:
    """Whether `image` was decoded below its original size because of the cap."""
    return image.info.get("original_size", image.size) != image.size


def _to_8bit(im: Image.Image) -> Image.Image:
    """An `L` image from a wider single-channel one (`I;16*`, `I`, `F`), scaled rather than
    clipped (PIL's `convert` clips at 255: a 16-bit image turns white, a 0-1 float one black).

    The white point is the range the values were stored in, when it can be told:
    - `I;16*` (16-bit): 65535 is white (divided by 257, the exact 16-to-8-bit map);
    - `I` (32-bit int, e.g. a 32-bit TIFF): values within 0..65535 are taken as 16-bit data
      widened (divided by 257; 8-bit values in an `I` image then read dark);
    - `F` (float): values within 0..1 are intensities (times 255), values within 0..255 are
      already 8-bit (kept, as PIL keeps them); NaN and infinities read as 0.
    Any other range (negative values, beyond 16 bits, floats over 255) has no known white:
    it is min-max scaled to 0..255 (a constant image is black)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.where(np.isfinite(a), a, 0)
    lo, hi = float(a.min()), float(a.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        lo, white = 0.0, 65535.0
    elif im.mode == "F" and lo >= 0 and hi <= 255:
        lo, white = 0.0, 1.0 if hi <= 1 else 255.0
    else:
        white = (hi - lo) or 1.0
    # float32: 4 bytes a pixel, exact enough for 8 bits out (and 65535 / 257 rounds exactly).
    scaled = (a.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / white)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
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


def decode_image(data: bytes, name: str = "", max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB image (transparent pixels composited on white),
    within the pixel cap. Raises OSError/ValueError/… for corrupt or truncated data; bytes that
    are no image raise an OSError naming `name` (a file or shard member), the format its
    extension promises and what the bytes look like. An image whose header declares more than
    `max_pixels` (any format; 0 = no limit), or by default more than `reader_pixel_limit`,
    raises `OversizeImage` before anything is decoded."""
    cap = _max_pixels
    try:
        with warnings.catch_warnings():  # PIL warns past 89 Mpx; our own limit decides here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise OSError(describe_unidentified(data, name)) from None
    with opened as im:
        original = im.size
        limit = reader_pixel_limit(im.format) if max_pixels is None else max_pixels
        if limit and original[0] * original[1] > limit:
            raise OversizeImage(original, limit, name)
        if cap and original[0] * original[1] > cap and im.format in _DRAFTABLE:
            k = _draft_factor(*original, cap)
            im.draft(im.mode, (math.ceil(original[0] / k), math.ceil(original[1] / k)))
        im.load()
        # after the load: a PNG's EXIF may follow its pixels, and reading it first decodes them
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        pixels = im.width * im.height
        factor = math.ceil(math.sqrt(pixels / cap)) if cap and pixels > cap else 1
        # L and RGB reduce to the same pixels before the conversion as after it (it works per
        # pixel), without its full-size copy: an 8192x8192 RGB PNG peaks at 385 MB, not 577.
        early = factor > 1 and im.mode in ("L", "RGB")
        out = _to_rgb(im.reduce(factor) if early else im)
    if factor > 1 and not early:
        out = out.reduce(factor)
    turn = _UPRIGHT.get(orientation)
    if turn is not None:  # a camera's EXIF orientation, shown upright as viewers show it
        out = out.transpose(turn)
        if orientation >= 5:  # turned a quarter: width and height swap
            original = (original[1], original[0])
    out.info["original_size"] = original
    return out


# EXIF's orientation tag, and the transposition that shows each value upright (its 1: as
# stored). transformers' `load_image` and HF datasets' `Image` feature apply it too, so an
# image reads here as it does there, and a phone's portrait photo is not read lying down.
EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
