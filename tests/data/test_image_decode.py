"""Image decoding: the pixel cap (reduced JPEG decoding above it only, exact below it, the
header's size kept, oversize images counted), bombs refused from the header, images over 8 bits
scaled to 8, and errors that name the file and the format."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from mm1.config import ConfigError, SourceConfig, load_config
from mm1.data.loader import LoaderSettings, packing_stats
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import ReadStats, read_llava, read_wds_shard
from mm1.data.sources.base import BadImage, image_from_bytes, image_from_path
from mm1.data.sources.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    OversizeImage,
    decode_image,
    max_image_pixels,
    reader_pixel_limit,
    set_max_image_pixels,
)
from mm1.data.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _default_cap():
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    yield
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)


def _encoded(width: int, height: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_under_the_cap_pixels_are_plain_pil(monkeypatch) -> None:
    data = _encoded(300, 200)
    set_max_image_pixels(300 * 200)  # exactly at the cap: not reduced
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile, "draft", lambda *a: drafts.append(a) or real(*a)
    )
    im = decode_image(data)
    with Image.open(io.BytesIO(data)) as ref:
        expected = np.asarray(ref.convert("RGB"))
    assert np.array_equal(np.asarray(im), expected) and drafts == []
    assert im.info["original_size"] == (300, 200)


def test_a_jpeg_over_the_cap_is_drafted(monkeypatch) -> None:
    data = _encoded(1001, 801)
    set_max_image_pixels(100_000)  # 1/2 scale is 501x401 > 100k; 1/4 is 251x201
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile, "draft", lambda *a: drafts.append(a) or real(*a)
    )
    im = decode_image(data)
    assert im.size == (251, 201) and im.mode == "RGB"
    assert im.info["original_size"] == (1001, 801)
    assert len(drafts) == 1 and drafts[0][2] == (251, 201)


def test_other_formats_over_the_cap_are_reduced() -> None:
    set_max_image_pixels(10_000)
    im = decode_image(_encoded(400, 300, "PNG"))
    assert im.width * im.height <= 10_000 and im.info["original_size"] == (400, 300)
    set_max_image_pixels(0)  # no cap
    assert decode_image(_encoded(400, 300, "PNG")).size == (400, 300)


def test_oversize_images_are_counted_by_the_readers(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "big.jpg").write_bytes(_encoded(640, 480))
    (tmp_path / "images" / "small.jpg").write_bytes(_encoded(64, 48))
    recs = [
        {"image": name, "conversations": [{"from": "human", "value": "<image>hi"}]}
        for name in ("big.jpg", "small.jpg")
    ]
    (tmp_path / "l.json").write_text(json.dumps(recs))
    set_max_image_pixels(80_000)
    stats = ReadStats()
    convs = list(read_llava(tmp_path / "l.json", stats=stats))
    assert [c.images[0].size for c in convs] == [(320, 240), (64, 48)]
    assert stats.images == 2 and stats.oversize_images == 1
    assert stats.to_dict()["oversize_images"] == 1


def test_the_loader_applies_the_configured_cap(tmp_path: Path, qwen_like) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "big.jpg").write_bytes(_encoded(640, 480))
    turns = [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "a cat"}]
    rec = {"image": "big.jpg", "conversations": turns}
    (tmp_path / "l.jsonl").write_text(json.dumps(rec) + "\n")
    settings = LoaderSettings(
        sources=[SourceConfig(format="llava", path=str(tmp_path / "l.jsonl"), kind="sft")],
        seq_len=32,
        micro_batch_size=1,
        prompt_format=PromptFormat(4),
        max_image_pixels=80_000,
    )
    stats = packing_stats(settings, Tokenizer.from_file(qwen_like(tmp_path / "tok")), 2)
    assert stats["read"]["oversize_images"] >= 1 and max_image_pixels() == 80_000


def test_the_cap_is_a_validated_config_key() -> None:
    assert load_config(None, ["data.max_image_pixels=0"]).data.max_image_pixels == 0
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels=-1"):
        load_config(None, ["data.max_image_pixels=-1"])


def test_bytes_that_are_no_image_are_named(tmp_path: Path, caplog) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    rec = {"image": "empty.png", "conversations": [{"from": "human", "value": "<image>hi"}]}
    (tmp_path / "l.json").write_text(json.dumps([rec]))
    members = [("0.jpg", b"<!DOCTYPE html><html>404</html>"), ("0.txt", b"a caption")]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        assert list(read_llava(tmp_path / "l.json", stats=stats)) == []
        assert list(read_wds_shard(tmp_path / "s.tar", stats=stats)) == []
    assert stats.skipped == {"corrupt_image": 2}
    assert "BytesIO" not in caplog.text
    assert "empty.png: not a readable image: expected PNG, the bytes are empty" in caplog.text
    assert "s.tar:0.jpg: not a readable image: expected JPEG, the bytes are an HTML page" in (
        caplog.text
    )


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_undraftable_bombs_are_refused_from_the_header(tmp_path: Path, monkeypatch) -> None:
    """A black PNG of a few hundred kB can declare a 300 MB bitmap: over 4x the cap (at least
    8192x8192) it is refused unread and skipped as `oversize_image`; at the limit it decodes."""
    limit = 4 * DEFAULT_MAX_IMAGE_PIXELS
    assert reader_pixel_limit("PNG") == limit == 8192 * 8192 and reader_pixel_limit("JPEG") == 0
    set_max_image_pixels(80_000)  # a small cap: the limit stays at the default cap's
    assert reader_pixel_limit("PNG") == limit
    set_max_image_pixels(20_000_000)
    assert reader_pixel_limit("WEBP") == 80_000_000
    set_max_image_pixels(0)  # no cap: no limit but PIL's
    assert reader_pixel_limit("PNG") == 0
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)

    bomb = _png(Image.new("L", (8193, 8192)))
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: loads.append(a))
    with pytest.raises(OversizeImage, match=r"b\.png: the image is 8193x8192 \(67117056 pixels"):
        decode_image(bomb, "b.png")
    with pytest.raises(BadImage) as err:
        image_from_bytes(bomb, "b.png")
    assert err.value.reason == "oversize_image" and loads == []
    monkeypatch.undo()

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bomb.png").write_bytes(bomb)
    (tmp_path / "images" / "ok.png").write_bytes(_png(Image.new("L", (8192, 8192))))
    recs = [
        {"image": name, "conversations": [{"from": "human", "value": "<image>hi"}]}
        for name in ("bomb.png", "ok.png")
    ]
    (tmp_path / "l.json").write_text(json.dumps(recs))
    stats = ReadStats()
    convs = list(read_llava(tmp_path / "l.json", stats=stats))
    assert [c.images[0].size for c in convs] == [(4096, 4096)]
    assert stats.skipped == {"oversize_image": 1} and stats.oversize_images == 1


def test_jpegs_over_the_limit_are_still_drafted() -> None:
    im = decode_image(_png(Image.new("L", (8200, 8200)), "JPEG"))
    assert im.size == (2050, 2050) and im.info["original_size"] == (8200, 8200)


def test_a_callers_limit_refuses_any_format() -> None:
    data = _encoded(300, 200)  # a JPEG, drafted by the readers' rule
    assert decode_image(data, max_pixels=60_000).size == (300, 200)
    with pytest.raises(OversizeImage, match="over the 59999-pixel limit"):
        decode_image(data, max_pixels=59_999)
    assert decode_image(data, max_pixels=0).size == (300, 200)  # 0: no limit


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_reducing_before_converting_gives_the_same_pixels(mode: str) -> None:
    data = _png(Image.open(io.BytesIO(_encoded(400, 300, "PNG"))).convert(mode))
    set_max_image_pixels(10_000)
    with Image.open(io.BytesIO(data)) as ref:
        expected = ref.convert("RGB").reduce(4)
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(expected))


def _gray(image: Image.Image) -> np.ndarray:
    """The one channel of a decoded image, checking it is gray RGB."""
    a = np.asarray(image)
    assert image.mode == "RGB" and (a == a[..., :1]).all()
    return a[..., 0]


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """PIL's convert clips 16-bit values at 255 (a 16-bit photo turns white): 65535 is white."""
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0..65535
    values[0, :4] = [1, 128, 129, 65534]  # rounding: 1/257 -> 0, 128 -> 0, 129 -> 1, 65534 -> 255
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected[0, :4] = [0, 0, 1, 255]
    for fmt in ("PNG", "TIFF"):
        data = _png(Image.fromarray(values), fmt)
        assert Image.open(io.BytesIO(data)).mode == "I;16"
        assert np.array_equal(_gray(decode_image(data)), expected), fmt
    (tmp_path / "deep.png").write_bytes(_png(Image.fromarray(values)))  # as `mm1 generate --image`
    assert np.array_equal(_gray(image_from_path(tmp_path / "deep.png")), expected)
    # 32-bit int (mode I): 16-bit values are scaled as 16-bit, any other range min-max.
    wide = Image.fromarray(values.astype(np.int32))
    assert np.array_equal(_gray(decode_image(_png(wide, "TIFF"))), expected)
    signed = Image.fromarray(np.array([[-1000, 0], [500, 1000]], dtype=np.int32))
    assert _gray(decode_image(_png(signed, "TIFF"))).tolist() == [[0, 128], [191, 255]]


def test_float_images_are_scaled_by_their_range() -> None:
    """Mode F: 0..1 is intensity (a 0-1 image no longer decodes all black), 0..255 is kept,
    any other range is min-max scaled; NaN reads as 0."""

    def decoded(rows: list[list[float]]) -> list[list[int]]:
        data = _png(Image.fromarray(np.array(rows, dtype=np.float32)), "TIFF")
        assert Image.open(io.BytesIO(data)).mode == "F"
        return _gray(decode_image(data)).tolist()

    assert decoded([[0.0, 0.25], [0.5, 1.0]]) == [[0, 64], [128, 255]]
    assert decoded([[0.0, 2.0], [127.6, 255.0]]) == [[0, 2], [128, 255]]
    assert decoded([[-1.0, 0.0], [1.0, 3.0]]) == [[0, 64], [128, 255]]
    assert decoded([[float("nan"), 0.5], [1.0, 0.0]]) == [[0, 128], [255, 0]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_exif_orientation_is_shown_upright_as_transformers_loads_it(tmp_path, fmt) -> None:
    """A phone's portrait photo is stored sideways with an EXIF orientation; transformers'
    `load_image` (and HF datasets) turn it upright. It was read lying down here."""
    from transformers.image_utils import load_image

    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        stored.save(path, fmt, exif=exif)
        got = decode_image(path.read_bytes(), path.name)
        want = load_image(str(path))
        assert got.size == want.size == ((40, 20) if orientation < 5 else (20, 40))
        assert np.array_equal(np.asarray(got), np.asarray(want)), orientation
        assert got.info["original_size"] == want.size


def test_webdataset_images_in_any_format_pil_reads(tmp_path: Path) -> None:
    """A .gif, .bmp or .tiff member is the sample's image, read as a .png one is; they were
    skipped as `missing_image`."""
    fmts = {"gif": "GIF", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF", "png": "PNG"}
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for i, (ext, fmt) in enumerate(fmts.items()):
            for name, data in ((f"{i}.{ext}", _encoded(16, 8, fmt)), (f"{i}.txt", b"a cap")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    records = list(read_wds_shard(tmp_path / "s.tar", stats=stats))
    assert len(records) == len(fmts) and not stats.skipped
    assert all(r.images[0].size == (16, 8) for r in records)
