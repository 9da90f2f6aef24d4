"""Text that is not valid Unicode (lone surrogates, bytes that are not UTF-8) in every reader:
repaired to U+FFFD, counted by reason, logged with the file and record."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mm1.config import SourceConfig
from mm1.data.loader import LoaderSettings, packing_stats
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import (
    ReadStats,
    read_coco_captions,
    read_llava,
    read_llava_yaml,
    read_mmc4_jsonl,
    read_obelics_parquet,
    read_text,
    read_wds_shard,
    reset_warning_counts,
)
from mm1.data.sources.unicode import repair_value
from mm1.data.tokenizer import Tokenizer

SURROGATE = "\ud800"  # what json.loads makes of the escape "\ud800"
BAD_BYTES = b"caf\xe9 \xed\xa0\x80"  # latin-1 byte, then a surrogate encoded as UTF-8 (CESU)


def _png(width: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _clean(text: str) -> bool:
    text.encode("utf-8")  # raises on any surrogate left
    return True


def _texts(records) -> list[str]:
    out = []
    for r in records:
        if hasattr(r, "messages"):
            out += [m["content"] for m in r.messages]
        else:
            out += [p for p in r.parts if isinstance(p, str)]
    return out


@pytest.fixture(autouse=True)
def _fresh_warnings():
    reset_warning_counts()


def test_repair_value_names_each_problem() -> None:
    value = {"a": ["ok", f"x{SURROGATE}"], f"k{SURROGATE}": 1}
    fixed, reasons = repair_value(value)
    assert fixed == {"a": ["ok", "x\ufffd"], "k\ufffd": 1} and reasons == {"lone_surrogate"}
    escaped = BAD_BYTES.decode("utf-8", errors="surrogateescape")
    fixed, reasons = repair_value([escaped], invalid_bytes=True)
    assert fixed == ["caf\ufffd \ufffd\ufffd\ufffd"] and reasons == {"invalid_utf8"}
    clean = {"a": "fine"}
    assert repair_value(clean)[0] is clean


@pytest.mark.parametrize("gz", [False, True])
def test_text_jsonl(tmp_path: Path, caplog, gz: bool) -> None:
    lines = [
        json.dumps({"text": f"a {SURROGATE} b"}).encode(),  # the escape \ud800 in the file
        b'{"text": "' + BAD_BYTES + b'"}',
        json.dumps({"text": "fine"}).encode(),
    ]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("t.jsonl.gz" if gz else "t.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(read_text(path, stats=stats))
    texts = _texts(docs)
    assert texts == ["a \ufffd b", "caf\ufffd \ufffd\ufffd\ufffd", "fine"]
    assert all(_clean(t) for t in texts)
    assert stats.repaired == {"lone_surrogate": 1, "invalid_utf8": 1}
    assert stats.skipped == {} and stats.records == 3
    assert stats.to_dict()["repaired"] == {"invalid_utf8": 1, "lone_surrogate": 1}
    assert f"{path}:1" in caplog.text and "lone_surrogate" in caplog.text
    assert f"{path}:2" in caplog.text and "invalid_utf8" in caplog.text


def test_text_parquet_with_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    # Arrow does not validate strings it reads; a strict decode used to abort the whole file.
    raw = pa.array([b"fine", BAD_BYTES], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": raw}), tmp_path / "t.parquet")
    stats = ReadStats()
    docs = list(read_text(tmp_path / "t.parquet", stats=stats))
    assert _texts(docs) == ["fine", "caf\ufffd \ufffd\ufffd\ufffd"]
    assert stats.repaired == {"invalid_utf8": 1}


def test_obelics_texts(tmp_path: Path) -> None:
    texts = pa.array([[b"fine", None], [BAD_BYTES, None]], type=pa.list_(pa.binary()))
    table = pa.table(
        {
            "images": pa.array([[None, _png()], [None, _png()]], type=pa.list_(pa.binary())),
            "texts": texts.cast(pa.list_(pa.binary())).view(pa.list_(pa.string())),
        }
    )
    pq.write_table(table, tmp_path / "o.parquet")
    stats = ReadStats()
    docs = list(read_obelics_parquet(tmp_path / "o.parquet", stats=stats))
    assert _texts(docs) == ["fine", "caf\ufffd \ufffd\ufffd\ufffd"]
    assert [d.num_images for d in docs] == [1, 1]  # image bytes are not decoded as text
    assert stats.repaired == {"invalid_utf8": 1}


def test_mmc4_jsonl(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png())
    rec = {
        "text_list": [f"one {SURROGATE}", "two"],
        "image_info": [{"image_name": "a.png", "matched_text_index": 0}],
    }
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n")
    stats = ReadStats()
    docs = list(read_mmc4_jsonl(tmp_path / "m.jsonl", stats=stats))
    assert _texts(docs) == ["one \ufffd two"]
    assert stats.repaired == {"lone_surrogate": 1}


def _llava_record(i: int) -> dict:
    return {
        "id": f"r{i}",
        "conversations": [
            {"from": "human", "value": f"hi {SURROGATE}"},
            {"from": "gpt", "value": "ok"},
        ],
    }


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava(tmp_path: Path, caplog, suffix: str) -> None:
    path = tmp_path / f"l{suffix}"
    recs = [_llava_record(0), {"id": "r1", "conversations": [{"from": "human", "value": "x"}]}]
    if suffix == ".json":
        path.write_text(json.dumps(recs))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        convs = list(read_llava(path, stats=stats))
    assert _texts(convs) == ["hi \ufffd", "ok", "x"]
    assert stats.repaired == {"lone_surrogate": 1}
    assert str(path) in caplog.text and "repaired" in caplog.text


def test_llava_json_with_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    rec = b'[{"conversations": [{"from": "human", "value": "' + BAD_BYTES + b'"}]}]'
    path.write_bytes(rec)
    stats = ReadStats()
    convs = list(read_llava(path, stats=stats))
    assert _texts(convs) == ["caf\ufffd \ufffd\ufffd\ufffd"]
    assert stats.repaired == {"invalid_utf8": 1}


def test_llava_yaml(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text(json.dumps([_llava_record(0)]))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "l.json"}]}))
    stats = ReadStats()
    convs = list(read_llava_yaml(tmp_path / "d.yaml", stats=stats))
    assert _texts(convs) == ["hi \ufffd", "ok"]
    assert stats.repaired == {"lone_surrogate": 1}


def test_coco_captions(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(_png())
    data = {
        "images": [{"id": 1, "file_name": "1.png"}],
        "annotations": [{"image_id": 1, "caption": f"a cat {SURROGATE}"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    stats = ReadStats()
    docs = list(read_coco_captions(tmp_path / "c.json", stats=stats))
    assert _texts(docs) == ["a cat \ufffd"]
    assert stats.repaired == {"lone_surrogate": 1}


def test_wds_captions(tmp_path: Path) -> None:
    members = [
        ("0.png", _png()),
        ("0.txt", BAD_BYTES),  # a caption file that is not UTF-8
        ("1.png", _png()),
        ("1.json", json.dumps({"caption": f"json {SURROGATE}"}).encode()),
        ("2.png", _png()),
        ("2.txt", b"plain"),
        ("2.json", b'{"note": "' + BAD_BYTES + b'"}'),  # the metadata is kept, repaired
    ]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    docs = list(read_wds_shard(tmp_path / "s.tar", stats=stats))
    assert _texts(docs) == ["caf\ufffd \ufffd\ufffd\ufffd", "json \ufffd", "plain"]
    assert docs[2].meta["note"] == "caf\ufffd \ufffd\ufffd\ufffd"
    assert stats.repaired == {"invalid_utf8": 2, "lone_surrogate": 1}


def test_data_stats_survive_a_lone_surrogate(tmp_path: Path, qwen_like) -> None:
    """`mm1 data stats` tokenizes what the readers give: it used to die with `TypeError:
    TextInputSequence must be str` from the HF tokenizer."""
    tok = Tokenizer.from_file(qwen_like(tmp_path / "tok"))
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"cat {i} {SURROGATE}"}) + "\n" for i in range(50)))
    settings = LoaderSettings(
        sources=[SourceConfig(format="text", path=str(path), kind="text")],
        seq_len=32,
        micro_batch_size=1,
        prompt_format=PromptFormat(4),
    )
    stats = packing_stats(settings, tok, 5)
    assert stats["read"]["repaired"]["lone_surrogate"] > 0
    assert stats["read"]["skipped"] == {}


def test_tokenizer_encodes_a_lone_surrogate(tmp_path: Path, qwen_like) -> None:
    tok = Tokenizer.from_file(qwen_like(tmp_path / "tok"))
    assert tok.encode(f"a {SURROGATE}") == tok.encode("a \ufffd")
