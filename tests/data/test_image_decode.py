"""Image decoding: the pixel cap (reduced JPEG decoding above it only, exact below it, the
header's size kept, oversize images counted) and errors that name the file and the format."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from mm1.config import ConfigError, SourceConfig, load_config
from mm1.data.loader import LoaderSettings, packing_stats
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import ReadStats, read_llava, read_wds_shard
from mm1.data.sources.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_image,
    max_image_pixels,
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
