"""Inputs the reader fuzz pass (benchmarks/fuzz_readers.py) found crashing a reader: each is
now skipped and counted, or refused with one line naming the file."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm1.config import SourceConfig
from mm1.data.catalog import check_sources
from mm1.data.sources import (
    DataError,
    ReadStats,
    read_coco_captions,
    read_llava,
    read_llava_yaml,
    read_mmc4_jsonl,
    read_obelics_parquet,
    read_text,
    read_wds_shard,
)
from mm1.data.sources.base import too_deep

DEEP = "[" * 100000 + "]" * 100000  # python's parser raises RecursionError on it


def _nested(depth: int) -> dict:
    v: dict = {"leaf": 1}
    for _ in range(depth):
        v = {"a": v}
    return v


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _llava(i: int, image: str | None = None) -> dict:
    rec = {"id": str(i), "conversations": [{"from": "human", "value": "hi"}]}
    rec["conversations"].append({"from": "gpt", "value": f"answer {i}"})
    if image is not None:
        rec["image"] = image
    return rec


def test_too_deep_counts_levels_without_recursion() -> None:
    assert not too_deep(_nested(99)) and too_deep(_nested(100))
    assert not too_deep([[1], {"a": []}, "x"]) and not too_deep(5)
    assert too_deep(_nested(50_000))  # a recursive walk would overflow here


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_deep_nesting_is_a_malformed_line(tmp_path: Path, gz: bool) -> None:
    lines = [
        DEEP,
        json.dumps({"text": "kept"}),
        json.dumps({"text": "deep field", "x": _nested(900)}),
    ]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("t.jsonl.gz" if gz else "t.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    stats = ReadStats()
    assert [d.parts for d in read_text(path, stats=stats)] == [["kept"]]
    assert stats.skipped == {"malformed_json": 2}


def test_llava_and_coco_deep_nesting(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text(DEEP)
    with pytest.raises(
        DataError, match=r"deep\.json: not valid JSON \(nested too deeply at byte 1\)"
    ):
        list(read_llava(tmp_path / "deep.json"))
    recs = [_llava(0), {**_llava(1), "x": _nested(900)}]
    (tmp_path / "l.json").write_text(json.dumps(recs))
    stats = ReadStats()
    assert [c.id for c in read_llava(tmp_path / "l.json", stats=stats)] == ["0"]
    assert stats.skipped == {"malformed_record": 1}
    (tmp_path / "c.json").write_text('{"images": ' + DEEP + ', "annotations": []}')
    with pytest.raises(DataError, match="nested too deeply"):
        list(read_coco_captions(tmp_path / "c.json"))
    coco = {
        "images": [{"id": 1, "file_name": "1.png", "x": _nested(900)}],
        "annotations": [{"image_id": 1, "caption": "c", "x": _nested(900)}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    stats = ReadStats()
    assert list(read_coco_captions(tmp_path / "c.json", stats=stats)) == []
    assert stats.skipped == {"malformed_annotation": 1, "malformed_record": 1}


def test_wds_deeply_nested_json_member_is_ignored(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in [("0.png", _png()), ("0.txt", b"cap"), ("0.json", DEEP.encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    docs = list(read_wds_shard(tmp_path / "s.tar"))
    assert [d.parts[1] for d in docs] == ["cap"] and docs[0].meta["__key__"] == "0"


@pytest.mark.parametrize("name", ["a" * 5000, "/".join(["d"] * 3000)])
def test_image_path_too_long_for_the_os_is_a_missing_image(tmp_path: Path, name: str) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    path = tmp_path / "l.jsonl"
    path.write_text(
        "".join(json.dumps(_llava(i, n)) + "\n" for i, n in enumerate([name, "ok.png"]))
    )
    stats = ReadStats()
    assert [c.id for c in read_llava(path, tmp_path, stats=stats)] == ["1"]
    assert stats.skipped == {"missing_image": 1}
    mmc4 = {"text_list": ["s"], "image_info": [{"image_name": name, "matched_text_index": 0}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(mmc4) + "\n")
    stats = ReadStats()
    assert list(read_mmc4_jsonl(tmp_path / "m.jsonl", image_dir=tmp_path, stats=stats)) == []
    assert stats.skipped == {"missing_image": 1}


def test_a_json_file_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataError, match=r"dir\.json: cannot read: Is a directory"):
        list(read_llava(tmp_path / "dir.json"))
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop2.json")
    (tmp_path / "loop2.json").symlink_to(tmp_path / "loop.json")
    with pytest.raises(DataError, match=r"loop\.json: cannot read: Too many levels"):
        list(read_coco_captions(tmp_path / "loop.json"))


@pytest.mark.parametrize(
    ("value", "kind"),
    [("not bytes", "str"), (10**10, "int"), ([1.5, 2.0], "list")],
)
def test_obelics_image_struct_with_non_bytes_is_malformed(
    tmp_path: Path, value: object, kind: str
) -> None:
    images = [[{"bytes": value, "path": None}], [None]]  # the struct keeps the value's type
    pq.write_table(
        pa.table({"images": images, "texts": [[None], ["kept"]]}), tmp_path / "o.parquet"
    )
    stats = ReadStats()
    docs = list(read_obelics_parquet(tmp_path / "o.parquet", stats=stats))
    assert [d.meta["__index__"] for d in docs] == [1]
    assert stats.skipped == {"malformed_record": 1}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("image_folder: 5", "dataset 0: `image_folder` must be a path, got int"),
        ("image_folder: [a, b]", "dataset 0: `image_folder` must be a path, got list"),
    ],
)
def test_llava_yaml_image_folder_of_the_wrong_type(tmp_path: Path, entry: str, match: str) -> None:
    (tmp_path / "l.json").write_text(json.dumps([_llava(0)]))
    (tmp_path / "d.yaml").write_text(f"datasets:\n  - json_path: l.json\n    {entry}\n")
    with pytest.raises(DataError, match=match):
        list(read_llava_yaml(tmp_path / "d.yaml"))


@pytest.mark.parametrize("strategy", ["random:inf%", "first:1e400%"])
def test_llava_yaml_infinite_sampling_number(tmp_path: Path, strategy: str) -> None:
    (tmp_path / "l.json").write_text(json.dumps([_llava(0)]))
    (tmp_path / "d.yaml").write_text(
        f"datasets:\n  - json_path: l.json\n    sampling_strategy: {strategy}\n"
    )
    with pytest.raises(ValueError, match=r"d\.yaml: dataset l\.json: bad number"):
        list(read_llava_yaml(tmp_path / "d.yaml"))


def test_llava_yaml_nested_too_deeply(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("datasets: " + "[" * 1500 + "]" * 1500 + "\n")
    with pytest.raises(DataError, match=r"d\.yaml: not valid YAML: nested too deeply"):
        list(read_llava_yaml(tmp_path / "d.yaml"))


def test_llava_yaml_json_path_too_long_for_the_os(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("datasets:\n  - json_path: " + "a" * 5000 + "\n")
    spec = SourceConfig(format="llava_yaml", path=str(tmp_path / "d.yaml"))
    with pytest.raises(FileNotFoundError, match=r"data.sources\[0\].path: .*no such file"):
        check_sources([spec])
    with pytest.raises(DataError, match="cannot read: File name too long"):
        list(read_llava_yaml(tmp_path / "d.yaml"))


def test_gzip_body_corruption_is_a_corrupt_file(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(200))
    raw = bytearray(gzip.compress(lines.encode(), mtime=0))
    raw[20] ^= 0xFF  # the deflate block header: zlib.error (not an OSError) from gzip
    (tmp_path / "t.jsonl.gz").write_bytes(bytes(raw))
    stats = ReadStats()
    docs = list(read_text(tmp_path / "t.jsonl.gz", stats=stats))
    assert len(docs) < 200 and stats.skipped.get("corrupt_file") == 1


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz"])
def test_utf8_bom_is_left_out(tmp_path: Path, suffix: str) -> None:
    recs = [_llava(0), _llava(1)]
    text = json.dumps(recs) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in recs)
    data = b"\xef\xbb\xbf" + text.encode()
    path = tmp_path / f"l{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    stats = ReadStats()
    assert [c.id for c in read_llava(path, stats=stats)] == ["0", "1"]
    assert stats.skipped == {}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])  # LE with its BOM; BE, BOM added
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", "coco.json", "text.jsonl"])
def test_utf16_files_are_refused_saying_so(tmp_path: Path, suffix: str, encoding: str) -> None:
    """Read as UTF-8 they were malformed_json on every line, or "not valid JSON" for the
    whole file; neither said why."""
    if suffix == "coco.json":
        text = json.dumps({"images": [], "annotations": []})
    elif suffix == "text.jsonl":
        text = json.dumps({"text": "a document"}) + "\n"
    else:
        recs = [_llava(0), _llava(1)]
        text = (
            json.dumps(recs) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in recs)
        )
    data = ("\ufeff" if encoding.endswith("be") else "") + text
    raw = data.encode(encoding)
    path = tmp_path / f"l{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    read = {"coco.json": read_coco_captions, "text.jsonl": read_text}.get(suffix, read_llava)
    with pytest.raises(DataError, match=r"UTF-16 text .*iconv -f UTF-16 -t UTF-8"):
        list(read(path, stats=ReadStats()))


def test_fuzz_harness_runs(tmp_path: Path) -> None:
    """The harness itself, at a tiny size: named cases of one kind plus a few random ones."""
    from benchmarks.fuzz_readers import main

    out = tmp_path / "fuzz.json"
    argv = ["--cases", "6", "--seed", "3", "--only", "PNG header", "--stats-every", "-1"]
    code = main([*argv, "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["counts"].get("CRASH", 0) == 0
    assert {c["input"] for c in result["cases"]} >= {"wds", "coco"} and len(result["cases"]) >= 20
    # a claim over the readers' pixel limit is refused from the header as oversize (12000x12000
    # decoded in full before); PIL's own bomb limit and impossible sizes stay corrupt
    for c in result["cases"]:
        reason = "oversize_image" if "12000x12000" in c["case"] else "corrupt_image"
        assert f"{reason}=" in c["summary"], c
