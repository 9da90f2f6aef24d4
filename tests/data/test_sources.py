"""Readers for real formats, on small files written here with known content."""

from __future__ import annotations

import gzip
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm1.data.catalog import count_records, detect_format, inspect_source, list_shards
from mm1.data.sources import (
    READERS,
    DataError,
    ReadStats,
    check_error_rate,
    read_coco_captions,
    read_llava,
    read_llava_yaml,
    read_mmc4_jsonl,
    read_obelics_parquet,
    read_text,
    read_wds_shard,
    reset_warning_counts,
    wds,
)
from tests.data.shards import encoded_image, wds_members, write_tar


def _widths(parts) -> list:
    return [p.width if isinstance(p, Image.Image) else p for p in parts]


# ----------------------------------------------------------------------------------------------
# WebDataset
# ----------------------------------------------------------------------------------------------


def test_wds_reads_samples(tmp_path):
    write_tar(tmp_path / "00000.tar", wds_members(5))
    stats = ReadStats()
    docs = list(read_wds_shard(tmp_path / "00000.tar", stats=stats, kind="cap"))
    assert [d.id for d in docs] == [f"{i:09d}" for i in range(5)]
    assert [_widths(d.parts) for d in docs] == [[10 + i, f"caption {i}"] for i in range(5)]
    assert all(d.kind == "cap" and d.parts[0].mode == "RGB" for d in docs)
    assert docs[3].meta["url"] == "http://x/3.jpg" and docs[3].meta["__index__"] == 3
    assert stats.records == 5 and stats.images == 5 and stats.skipped == {}


def test_wds_start_skips_without_decoding(tmp_path, monkeypatch):
    write_tar(tmp_path / "s.tar", wds_members(6))
    decoded = []
    real = wds.image_from_bytes
    monkeypatch.setattr(wds, "image_from_bytes", lambda *a: decoded.append(1) or real(*a))
    docs = list(read_wds_shard(tmp_path / "s.tar", start=4))
    assert [d.meta["__index__"] for d in docs] == [4, 5]
    assert [d.parts[1] for d in docs] == ["caption 4", "caption 5"]
    assert len(decoded) == 2


def test_wds_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    members = wds_members(5)
    members[3] = ("000000001.jpg", b"\xff\xd8 not really a jpeg")  # corrupt image
    members = [m for m in members if m[0] != "000000002.txt"]  # missing caption, json has one
    members = [m for m in members if not m[0].startswith("000000004.")]
    members += [
        ("000000004.jpg", encoded_image(14)),
        ("000000004.json", b"{}"),
    ]  # no caption at all
    members += [("000000005.txt", b"caption without image")]
    write_tar(tmp_path / "bad.tar", members)
    reset_warning_counts()
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="mm1.data.sources"):
        docs = list(read_wds_shard(tmp_path / "bad.tar", stats=stats))
    assert [d.id for d in docs] == ["000000000", "000000002", "000000003"]
    assert docs[1].parts[1] == "caption 2"  # from the json
    assert docs[2].parts[0].width == 13 and docs[2].parts[0].format is None
    assert stats.skipped == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1}
    assert stats.records == 3 and stats.error_rate == pytest.approx(0.5)
    assert "corrupt_image" in caplog.text and "000000001" in caplog.text


def test_wds_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    path = tmp_path / "t.tar"
    write_tar(path, wds_members(5))
    with tarfile.open(path) as tf:
        jpg3 = tf.getmember("000000003.jpg")
        json2 = tf.getmember("000000002.json")
    data = path.read_bytes()
    # Cut inside sample 3's image data: samples 0-2 are read, sample 3 is dropped.
    (tmp_path / "mid.tar").write_bytes(data[: jpg3.offset_data + 20])
    stats = ReadStats()
    docs = list(read_wds_shard(tmp_path / "mid.tar", stats=stats))
    assert [d.parts[1] for d in docs] == ["caption 0", "caption 1", "caption 2"]
    assert stats.skipped == {"truncated_tar": 1}
    # Cut at a member boundary: tarfile would stop silently; the reader notices the missing
    # end-of-archive marker and drops the (possibly incomplete) last sample.
    (tmp_path / "edge.tar").write_bytes(data[: json2.offset_data + 512])
    stats = ReadStats()
    docs = list(read_wds_shard(tmp_path / "edge.tar", stats=stats))
    assert [d.parts[1] for d in docs] == ["caption 0", "caption 1"]
    assert stats.skipped == {"truncated_tar": 1}
    # Cut inside a header; and a file that is not a tar at all.
    (tmp_path / "hdr.tar").write_bytes(data[: jpg3.offset + 100])
    stats = ReadStats()
    assert len(list(read_wds_shard(tmp_path / "hdr.tar", stats=stats))) == 2
    assert stats.skipped == {"truncated_tar": 1}
    (tmp_path / "junk.tar").write_bytes(b"junk" * 10)
    stats = ReadStats()
    assert list(read_wds_shard(tmp_path / "junk.tar", stats=stats)) == []
    assert stats.skipped == {"corrupt_tar": 1}
    # The complete file is fine.
    stats = ReadStats()
    assert len(list(read_wds_shard(path, stats=stats))) == 5 and stats.skipped == {}


def test_warnings_are_rate_limited(tmp_path, caplog):
    members = []
    for i in range(40):
        members += [(f"{i:09d}.jpg", b"garbage"), (f"{i:09d}.txt", b"c")]
    write_tar(tmp_path / "g.tar", members)
    reset_warning_counts()
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="mm1.data.sources"):
        assert list(read_wds_shard(tmp_path / "g.tar", stats=stats)) == []
    assert stats.skipped == {"corrupt_image": 40}
    # First 5, then the 8th, 16th and 32nd.
    assert len([r for r in caplog.records if "corrupt_image" in r.getMessage()]) == 8


# ----------------------------------------------------------------------------------------------
# OBELICS parquet
# ----------------------------------------------------------------------------------------------


def _obelics(path: Path, rows: list[tuple[list, list]], image_type=None, **kw) -> None:
    image_type = pa.binary() if image_type is None else image_type
    table = pa.table(
        {
            "images": pa.array([r[0] for r in rows], type=pa.list_(image_type)),
            "texts": pa.array([r[1] for r in rows], type=pa.list_(pa.string())),
            "metadata": [json.dumps([None] * len(r[0])) for r in rows],
            "general_metadata": [json.dumps({"url": f"http://doc/{i}"}) for i in range(len(rows))],
        }
    )
    pq.write_table(table, path, **kw)


def test_obelics_with_image_bytes(tmp_path):
    rows = [
        ([None, encoded_image(11), None], ["Intro.", None, "About it."]),
        ([encoded_image(12), encoded_image(13), None], [None, None, "Two images."]),
        ([None, None], ["", "   "]),  # empty document
        ([encoded_image(14), None], ["both set", "text"]),  # malformed position
        ([b"corrupt", None], [None, "text"]),  # corrupt image
        ([None], ["Only text."]),
    ]
    _obelics(tmp_path / "o.parquet", rows)
    stats = ReadStats()
    docs = list(read_obelics_parquet(tmp_path / "o.parquet", stats=stats, kind="il"))
    assert [_widths(d.parts) for d in docs] == [
        ["Intro.", 11, "About it."],
        [12, 13, "Two images."],
        ["Only text."],
    ]
    assert [d.meta["__index__"] for d in docs] == [0, 1, 5]
    assert docs[1].meta["general_metadata"] == {"url": "http://doc/1"}
    assert docs[0].kind == "il" and docs[0].id == "o.parquet:0"
    assert stats.skipped == {"empty_document": 1, "malformed_record": 1, "corrupt_image": 1}
    assert stats.images == 3
    # drop_bad_images keeps the document without its corrupt image.
    stats = ReadStats()
    kept = list(read_obelics_parquet(tmp_path / "o.parquet", stats=stats, drop_bad_images=True))
    assert _widths(kept[2].parts) == ["text"] and stats.dropped_images == 1


def test_obelics_start_skips_row_groups(tmp_path):
    rows = [([encoded_image(10 + i)], [None]) for i in range(7)]
    _obelics(tmp_path / "rg.parquet", rows, row_group_size=2)
    assert pq.ParquetFile(tmp_path / "rg.parquet").num_row_groups == 4
    docs = list(read_obelics_parquet(tmp_path / "rg.parquet", start=5))
    assert [d.parts[0].width for d in docs] == [15, 16]
    assert [d.meta["__index__"] for d in docs] == [5, 6]
    docs = list(read_obelics_parquet(tmp_path / "rg.parquet", start=3))
    assert [d.parts[0].width for d in docs] == [13, 14, 15, 16]


def test_obelics_with_local_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(encoded_image(21))
    (tmp_path / "abs.png").write_bytes(encoded_image(22))
    rows = [
        (["a.png", None, str(tmp_path / "abs.png")], [None, "between", None]),
        (["missing.png", None], [None, "text"]),
    ]
    _obelics(tmp_path / "p.parquet", rows, image_type=pa.string())
    stats = ReadStats()
    docs = list(
        read_obelics_parquet(
            tmp_path / "p.parquet",
            stats=stats,
            image_root=tmp_path / "imgs",
            allow_absolute_paths=True,  # an absolute path is refused by default
        )
    )
    assert [_widths(d.parts) for d in docs] == [[21, "between", 22]]
    assert stats.skipped == {"missing_image": 1}


def test_obelics_hf_image_structs(tmp_path):
    (tmp_path / "s.png").write_bytes(encoded_image(31))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        (
            [{"bytes": encoded_image(30), "path": None}, {"bytes": None, "path": "s.png"}, None],
            [None, None, "t"],
        )
    ]
    _obelics(tmp_path / "hf.parquet", rows, image_type=struct)
    docs = list(read_obelics_parquet(tmp_path / "hf.parquet"))
    assert _widths(docs[0].parts) == [30, 31, "t"]


def test_obelics_url_images_raise_a_clear_error(tmp_path):
    rows = [([None], ["fine"]), ([None, "https://example.com/cat.jpg"], ["text", None])]
    _obelics(tmp_path / "urls.parquet", rows, image_type=pa.string())
    with pytest.raises(DataError, match=r"urls\.parquet: row 1.*download them first.*img2dataset"):
        list(read_obelics_parquet(tmp_path / "urls.parquet"))


def test_obelics_missing_columns(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="images"):
        list(read_obelics_parquet(tmp_path / "x.parquet"))


def test_obelics_non_string_texts_are_skipped_and_counted(tmp_path):
    # A malformed file whose `texts` hold numbers or structs: each row is a bad record.
    for name, texts, text_type in [
        ("ints.parquet", [[None, 5], [7]], pa.int64()),
        ("structs.parquet", [[None, {"a": "x"}], [{"a": "y"}]], pa.struct([("a", pa.string())])),
    ]:
        table = pa.table(
            {
                "images": pa.array([[encoded_image(10), None], [None]], type=pa.list_(pa.binary())),
                "texts": pa.array(texts, type=pa.list_(text_type)),
            }
        )
        pq.write_table(table, tmp_path / name)
        stats = ReadStats()
        assert list(read_obelics_parquet(tmp_path / name, stats=stats)) == []
        assert stats.skipped == {"malformed_record": 2} and stats.records == 0, name


# ----------------------------------------------------------------------------------------------
# MMC4
# ----------------------------------------------------------------------------------------------


def test_mmc4_image_placement(tmp_path):
    (tmp_path / "images").mkdir()
    for name, w in (("x.png", 41), ("y.png", 42), ("z.png", 43)):
        (tmp_path / "images" / name).write_bytes(encoded_image(w))
    rec = {
        "text_list": ["A.", "B.", "C."],
        "image_info": [
            {
                "image_name": "x.png",
                "raw_url": "http://x",
                "matched_text_index": 1,
                "matched_sim": 0.3,
            },
            {
                "image_name": "y.png",
                "raw_url": "http://y",
                "matched_text_index": 1,
                "matched_sim": 0.2,
            },
            {
                "image_name": "z.png",
                "raw_url": "http://z",
                "matched_text_index": 2,
                "matched_sim": 0.4,
            },
        ],
    }
    lines = [
        json.dumps(rec),
        "{not json",
        json.dumps({**rec, "image_info": [{"image_name": "nope.png", "matched_text_index": 0}]}),
        json.dumps({**rec, "image_info": [{"image_name": "x.png", "matched_text_index": 7}]}),
        json.dumps({"text_list": ["Just text."], "image_info": []}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    docs = list(read_mmc4_jsonl(tmp_path / "docs.jsonl", stats=stats))
    assert [_widths(d.parts) for d in docs] == [["A.", 41, 42, "B.", 43, "C."], ["Just text."]]
    assert stats.skipped == {"malformed_json": 1, "missing_image": 1, "malformed_record": 1}
    after = list(read_mmc4_jsonl(tmp_path / "docs.jsonl", image_position="after"))
    assert _widths(after[0].parts) == ["A. B.", 41, 42, "C.", 43]
    # Explicit image_dir, and `start` counts raw (non-blank) lines.
    docs = list(read_mmc4_jsonl(tmp_path / "docs.jsonl", start=4, image_dir=tmp_path / "images"))
    assert [d.meta["__index__"] for d in docs] == [4]
    with pytest.raises(ValueError, match="image_position"):
        list(read_mmc4_jsonl(tmp_path / "docs.jsonl", image_position="middle"))


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


def test_text_jsonl_parquet_and_gzip(tmp_path):
    lines = [
        '{"text": "one", "id": "a"}',
        "{broken",
        "",
        '{"text": "  "}',
        '{"text": "two"}',
        "[1]",
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    docs = list(read_text(tmp_path / "t.jsonl", stats=stats))
    assert [(d.id, d.parts) for d in docs] == [("a", ["one"]), ("t.jsonl:3", ["two"])]
    assert stats.skipped == {"malformed_json": 1, "empty_document": 1, "malformed_record": 1}
    assert [d.parts for d in read_text(tmp_path / "t.jsonl", start=3)] == [["two"]]

    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write('{"content": "zipped"}\n')
    assert [d.parts for d in read_text(tmp_path / "t.jsonl.gz", field="content")] == [["zipped"]]

    pq.write_table(
        pa.table({"text": ["p0", None, "p2", "p3"]}), tmp_path / "t.parquet", row_group_size=2
    )
    stats = ReadStats()
    docs = list(read_text(tmp_path / "t.parquet", stats=stats, kind="txt"))
    assert [d.parts[0] for d in docs] == ["p0", "p2", "p3"] and docs[0].kind == "txt"
    assert stats.skipped == {"empty_document": 1}
    assert [d.parts[0] for d in read_text(tmp_path / "t.parquet", start=3)] == ["p3"]


# ----------------------------------------------------------------------------------------------
# COCO captions
# ----------------------------------------------------------------------------------------------


def _coco(tmp_path: Path, images: object, annotations: object) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / "images" / f"{i}.png").write_bytes(encoded_image(60 + i))
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_malformed_entries_are_skipped_and_counted(tmp_path):
    images = [
        {"id": 0, "file_name": "0.png"},
        "not an image",  # malformed record
        {"id": 2, "file_name": "2.png"},  # its only annotation is malformed
        {"id": [3], "file_name": "3.png"},  # unusable id
        {"id": 4, "file_name": "1.png"},
    ]
    annotations = [
        {"image_id": 0, "caption": " A red square. "},
        "oops",
        7,
        None,
        {"image_id": 2, "caption": {"text": "not a string"}},
        {"image_id": [0], "caption": "unusable image_id"},
        {"image_id": 4, "caption": "Another."},
    ]
    path = _coco(tmp_path, images, annotations)
    stats = ReadStats()
    docs = list(read_coco_captions(path, stats=stats))
    assert [(d.id, _widths(d.parts)) for d in docs] == [
        ("0", [60, "A red square."]),
        ("4", [61, "Another."]),
    ]
    assert [d.meta["__index__"] for d in docs] == [0, 4]
    assert stats.records == 2 and stats.images == 2
    assert stats.skipped == {
        "malformed_annotation": 5,
        "malformed_record": 2,
        "missing_caption": 1,
    }
    assert count_records(path, "coco") == 5  # record indices are the file's image positions
    # Annotations are counted once per pass from the file's start, not again on a resume.
    stats = ReadStats()
    assert [d.id for d in read_coco_captions(path, start=2, stats=stats)] == ["4"]
    assert stats.skipped == {"malformed_record": 1, "missing_caption": 1}


@pytest.mark.parametrize(
    "content",
    [
        {"images": [], "annotations": {"0": {"image_id": 0, "caption": "x"}}},
        {"images": {"id": 0}, "annotations": []},
        {"images": []},
        [{"id": 0}],
    ],
)
def test_coco_structurally_wrong_file_raises_naming_it(tmp_path, content):
    path = tmp_path / "bad_coco.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"bad_coco\.json"):
        list(read_coco_captions(path))


# ----------------------------------------------------------------------------------------------
# LLaVA
# ----------------------------------------------------------------------------------------------


def _llava_records() -> list[dict]:
    h, g = "human", "gpt"
    return [
        {
            "id": "single",
            "image": "a.png",
            "conversations": [
                {"from": h, "value": "<image>\nWhat is it?"},
                {"from": g, "value": "A thing."},
            ],
        },
        {
            "id": "untagged",
            "image": "a.png",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": h, "value": "Describe."},
                {"from": g, "value": "Red."},
                {"from": h, "value": "More?"},
                {"from": g, "value": "No."},
            ],
        },
        {
            "id": "multi",
            "image": ["a.png", "sub/b.png"],
            "conversations": [
                {"from": h, "value": "<image> then <image>: which is wider?"},
                {"from": g, "value": "The second."},
            ],
        },
        {"id": "text", "conversations": [{"from": h, "value": "2+2?"}, {"from": g, "value": "4"}]},
        {
            "id": "mismatch",
            "image": ["a.png", "sub/b.png"],
            "conversations": [
                {"from": h, "value": "<image> only one tag"},
                {"from": g, "value": "x"},
            ],
        },
        {
            "id": "tag_without_image",
            "conversations": [{"from": h, "value": "<image> hi"}, {"from": g, "value": "x"}],
        },
        {
            "id": "missing_file",
            "image": "gone.png",
            "conversations": [{"from": h, "value": "<image> hi"}, {"from": g, "value": "x"}],
        },
        {"id": "bad_role", "conversations": [{"from": "robot", "value": "hi"}]},
    ]


@pytest.fixture
def llava_dir(tmp_path) -> Path:
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "a.png").write_bytes(encoded_image(51))
    (tmp_path / "imgs" / "sub" / "b.png").write_bytes(encoded_image(52))
    (tmp_path / "data.json").write_text(json.dumps(_llava_records()))
    return tmp_path


def test_llava_json(llava_dir):
    stats = ReadStats()
    convs = list(read_llava(llava_dir / "data.json", llava_dir / "imgs", stats=stats))
    by_id = {c.id: c for c in convs}
    assert list(by_id) == ["single", "untagged", "multi", "text"]
    assert by_id["single"].messages == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A thing."},
    ]
    untagged = by_id["untagged"].messages
    assert [m["role"] for m in untagged] == ["system", "user", "assistant", "user", "assistant"]
    assert untagged[1]["content"] == "<image>\nDescribe." and untagged[3]["content"] == "More?"
    assert [im.width for im in by_id["multi"].images] == [51, 52]
    assert by_id["text"].images == [] and by_id["text"].kind == "sft"
    assert stats.skipped == {"image_count_mismatch": 2, "missing_image": 1, "malformed_record": 1}
    assert stats.records == 4 and stats.images == 4
    assert [c.id for c in read_llava(llava_dir / "data.json", llava_dir / "imgs", start=2)][:1] == [
        "multi"
    ]


def test_llava_jsonl(llava_dir):
    lines = [json.dumps(r) for r in _llava_records()[:4]]
    lines.insert(1, "{oops")
    (llava_dir / "data.jsonl").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    convs = list(read_llava(llava_dir / "data.jsonl", llava_dir / "imgs", stats=stats))
    assert [c.id for c in convs] == ["single", "untagged", "multi", "text"]
    assert stats.skipped == {"malformed_json": 1}
    # a resume past a bad record does not count it again (.jsonl and .json alike)
    (llava_dir / "data2.json").write_text(json.dumps([5, *_llava_records()[:3]]))
    for name, start in (("data.jsonl", 2), ("data2.json", 1)):
        stats = ReadStats()
        convs = list(read_llava(llava_dir / name, llava_dir / "imgs", stats=stats, start=start))
        assert convs and stats.skipped == {}, name


def test_llava_conversations_of_another_type_are_malformed_not_empty(tmp_path, caplog):
    """`"conversations": "oops"` was counted as an empty document ("no conversations")."""
    recs = [{"id": "a", "conversations": "oops"}, {"id": "b", "conversations": []}]
    (tmp_path / "c.json").write_text(json.dumps(recs))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="mm1.data.sources"):
        assert list(read_llava(tmp_path / "c.json", tmp_path, stats=stats)) == []
    assert stats.skipped == {"malformed_record": 1, "empty_document": 1}
    assert "`conversations` is a str, not a list" in caplog.text


def test_llava_bad_json_file_raises(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json"):
        list(read_llava(tmp_path / "broken.json", tmp_path))


def _yaml_fixture(tmp_path: Path, strategy: str) -> Path:
    recs = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}],
        }
        for i in range(10)
    ]
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "sub" / "ten.json").write_text(json.dumps(recs))
    y = tmp_path / f"{strategy.replace(':', '_').replace('%', 'pc')}.yaml"
    y.write_text(f"datasets:\n  - json_path: sub/ten.json\n    sampling_strategy: '{strategy}'\n")
    return y


@pytest.mark.parametrize(
    "strategy, ids",
    [
        ("all", [str(i) for i in range(10)]),
        ("first:3", ["0", "1", "2"]),
        ("end:2", ["8", "9"]),
        ("first:10%", ["0"]),
        ("end:25%", ["7", "8", "9"]),  # ceil(2.5) = 3, as LLaVA-NeXT rounds
        ("first:50", [str(i) for i in range(10)]),
    ],
)
def test_llava_yaml_strategies(tmp_path, strategy, ids):
    y = _yaml_fixture(tmp_path, strategy)
    convs = list(read_llava_yaml(y))
    assert [c.id for c in convs] == ids
    assert all(c.meta["dataset"] == "sub/ten.json" for c in convs)
    assert count_records(y, "llava_yaml") == len(ids)
    # Resuming: `start` counts selected records; `__index__` is the position among them.
    assert [c.meta["__index__"] for c in convs] == list(range(len(ids)))
    assert [c.id for c in read_llava_yaml(y, start=1)] == ids[1:]


def test_llava_yaml_random_is_seeded(tmp_path):
    y = _yaml_fixture(tmp_path, "random:30%")
    picks = {seed: [c.id for c in read_llava_yaml(y, seed=seed)] for seed in range(6)}
    assert all(len(p) == 3 and len(set(p)) == 3 for p in picks.values())
    assert picks[0] == [c.id for c in read_llava_yaml(y, seed=0)]
    assert len({tuple(p) for p in picks.values()}) > 1
    assert [c.id for c in read_llava_yaml(_yaml_fixture(tmp_path, "random:10"), seed=1)] == [
        str(i) for i in range(10)
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_yaml_parses_only_the_chosen_records(tmp_path, monkeypatch, suffix):
    """`random:30%` of a plain JSON list parses 3 of its 10 records (the index's spans); a JSONL
    file is read through from the first chosen line. The same records either way, the same
    positions on a resume."""
    from mm1.data.sources import json_list

    y = _yaml_fixture(tmp_path, "random:30%")
    if suffix == ".jsonl":
        recs = json.loads((tmp_path / "sub" / "ten.json").read_text())
        (tmp_path / "sub" / "ten.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        y.write_text(y.read_text().replace("ten.json", "ten.jsonl"))
    parsed: list[int] = []
    read = json_list.JsonList._read

    def counting(self, f, i):
        parsed.append(i)
        return read(self, f, i)

    monkeypatch.setattr(json_list.JsonList, "_read", counting)
    convs = list(read_llava_yaml(y, seed=3))
    assert len(convs) == 3 and [c.meta["__index__"] for c in convs] == [0, 1, 2]
    assert parsed == ([c.meta["__record__"] for c in convs] if suffix == ".json" else [])
    assert [c.id for c in read_llava_yaml(y, seed=3, start=2)] == [convs[2].id]


def test_llava_yaml_image_folder_and_errors(llava_dir):
    (llava_dir / "d.yaml").write_text(
        "datasets:\n  - json_path: data.json\n    sampling_strategy: first:1\n    image_folder: imgs\n"
    )
    convs = list(read_llava_yaml(llava_dir / "d.yaml"))
    assert [c.id for c in convs] == ["single"] and convs[0].images[0].width == 51
    (llava_dir / "bad.yaml").write_text(
        "datasets:\n  - json_path: data.json\n    sampling_strategy: middle:3\n"
    )
    with pytest.raises(ValueError, match="sampling_strategy"):
        list(read_llava_yaml(llava_dir / "bad.yaml"))


# ----------------------------------------------------------------------------------------------
# Stats, shards, counting, detection, inspection
# ----------------------------------------------------------------------------------------------


def test_read_stats_and_error_rate_check():
    a = ReadStats(records=8, images=8, skipped={"corrupt_image": 1})
    b = ReadStats(records=1, skipped={"corrupt_image": 1, "missing_caption": 1})
    a.merge(b)
    assert a.records == 9 and a.skipped == {"corrupt_image": 2, "missing_caption": 1}
    assert a.error_rate == pytest.approx(3 / 12)
    assert ReadStats.from_dict(a.to_dict()) == a
    assert ReadStats().error_rate == 0.0
    check_error_rate(a, 0.3, "web-captions")
    with pytest.raises(DataError, match=r"'web-captions'.*3 of 12.*corrupt_image=2"):
        check_error_rate(a, 0.2, "web-captions")
    check_error_rate(a, 0.2, "web-captions", min_seen=100)  # too early to judge
    with pytest.raises(DataError, match="Fix or remove the bad shards, or raise data.max_error"):
        check_error_rate(a, 0.2, "web-captions")
    # skips the config causes: the message names the setting, not the data
    long = ReadStats(records=6, skipped={"too_long": 3, "corrupt_image": 1})
    with pytest.raises(DataError, match=r"Most were too_long: raise data.seq_len \(an image's"):
        check_error_rate(long, 0.01, "sft")


def test_list_shards_and_count_records(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in (10, 2, 0, 1):
        write_tar(d / f"part-{i}.tar", wds_members(i + 1))
    (d / "notes.txt").write_text("x")
    (d / "_tmp.tar").write_text("x")
    expected = [d / f"part-{i}.tar" for i in (0, 1, 2, 10)]
    assert list_shards(d, "wds") == expected
    assert list_shards(str(d / "part-*.tar"), "wds") == expected
    assert list_shards(str(d / "part-{0..2}.tar"), "wds") == expected[:3]
    assert list_shards(d / "part-2.tar", "wds") == [d / "part-2.tar"]
    assert [count_records(p, "wds") for p in expected] == [1, 2, 3, 11]
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path / "nowhere", "wds")
    with pytest.raises(FileNotFoundError):
        list_shards(d, "obelics")
    with pytest.raises(ValueError, match="unknown data format"):
        list_shards(d, "csv")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert count_records(tmp_path / "t.jsonl", "text") == 2


def test_detect_format_and_readers_registry(tmp_path, llava_dir):
    assert set(READERS) >= {"wds", "obelics", "mmc4", "text", "llava"}
    write_tar(tmp_path / "a.tar", wds_members(1))
    _obelics(tmp_path / "o.parquet", [([None], ["t"])])
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    (tmp_path / "m.jsonl").write_text(json.dumps({"text_list": [], "image_info": []}) + "\n")
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "l.jsonl").write_text(json.dumps(_llava_records()[3]) + "\n")
    got = {n: detect_format(tmp_path / n) for n in ("a.tar", "o.parquet", "t.parquet", "m.jsonl")}
    got.update({n: detect_format(tmp_path / n) for n in ("t.jsonl", "l.jsonl")})
    assert got == {
        "a.tar": "wds",
        "o.parquet": "obelics",
        "t.parquet": "text",
        "m.jsonl": "mmc4",
        "t.jsonl": "text",
        "l.jsonl": "llava",
    }
    assert detect_format(llava_dir / "data.json") == "llava"


def test_inspect_source(tmp_path, llava_dir):
    d = tmp_path / "caps"
    d.mkdir()
    write_tar(d / "00000.tar", wds_members(3))
    write_tar(d / "00001.tar", wds_members(2))
    info = inspect_source(d, n=4)
    assert info["format"] == "wds" and info["shards"] == 2 and info["records"] == 5
    assert [s["text"] for s in info["samples"]] == [
        "<image 10x8> caption 0",
        "<image 11x8> caption 1",
        "<image 12x8> caption 2",
        "<image 10x8> caption 0",
    ]
    info = inspect_source(llava_dir / "data.json", n=3, image_folder=llava_dir / "imgs")
    assert info["format"] == "llava" and info["records"] == 8
    assert info["samples"][2]["text"] == (
        "user: <image 51x8> then <image 52x8>: which is wider?\nassistant: The second."
    )


def test_a_jsonl_skip_names_the_line_and_the_record_the_readers_count(tmp_path, caplog):
    """A JSONL reader's skips said `FILE:LINE` for bad JSON but "line record N" (N counting
    records from 0, blank lines left out) for a bad record: a user opening line N found another
    record. Each now says which it is."""
    f = tmp_path / "docs.jsonl"
    good = {"text_list": ["a"], "image_info": []}
    lines = [json.dumps(good), "", "{not json", json.dumps({"text_list": "oops"})]
    f.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="mm1.data.sources"):
        docs = list(read_mmc4_jsonl(f, stats=ReadStats()))
    assert len(docs) == 1
    assert f"skipped {f}:3 (record 1): malformed_json" in caplog.text
    assert f"skipped {f}: record 2: malformed_record" in caplog.text
