"""Format detection and the errors users see for bad paths, formats and bad-record rates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mm1 import cli
from mm1.data import catalog
from mm1.data.catalog import count_records, detect_format, inspect_source, list_shards
from mm1.data.sources import DataError, ReadStats, check_error_rate


def _png(width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _coco(tmp_path: Path, n: int = 3, extra_images: int = 0) -> Path:
    """COCO captions laid out as the real files are: info, then images, then annotations."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(n):
        (tmp_path / "images" / f"{i}.png").write_bytes(_png(40 + i))
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(n)]
    images += [{"id": 1000 + i, "file_name": f"missing-{i}.png"} for i in range(extra_images)]
    data = {
        "info": {"description": "test"},
        "images": images,
        "annotations": [{"image_id": i, "id": i, "caption": f"caption {i}"} for i in range(n)],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data, indent=1))
    return path


# ----------------------------------------------------------------------------------------------
# COCO detection
# ----------------------------------------------------------------------------------------------


def test_coco_captions_json_is_detected(tmp_path):
    path = _coco(tmp_path)
    assert detect_format(path) == "coco"
    info = inspect_source(path, n=2)
    assert info["format"] == "coco" and info["records"] == 3
    assert [s["text"] for s in info["samples"]] == [
        "<image 40x8> caption 0",
        "<image 41x8> caption 1",
    ]


def test_coco_detection_finds_annotations_far_from_the_start(tmp_path, monkeypatch):
    # `annotations` comes after a large `images` list (well past the first chunk read).
    path = _coco(tmp_path, extra_images=30000)
    assert path.read_bytes().index(b'"annotations"') > catalog._CHUNK_BYTES
    assert detect_format(path) == "coco"
    # Keys split across chunk boundaries are still found, whatever the chunk size.
    for size in (5, 7, 13):
        monkeypatch.setattr(catalog, "_CHUNK_BYTES", size)
        (tmp_path / f"s{size}").mkdir()
        assert detect_format(_coco(tmp_path / f"s{size}", n=2)) == "coco"


def test_coco_detection_tolerates_a_bom_and_any_key_order(tmp_path):
    path = tmp_path / "caps.json"
    body = json.dumps({"annotations": [], "licenses": [], "images": []})
    path.write_bytes(b"\xef\xbb\xbf\n  " + body.encode())
    assert detect_format(path) == "coco"


@pytest.mark.parametrize(
    "content",
    [
        {"images": []},  # no annotations
        {"annotations": [], "questions": []},  # VQA-style annotations
        {"info": {"note": 'a string saying "images": [ and "annotations": ['}},
        {"images": 3, "annotations": 4},  # not lists
        [{"id": 0}],  # a list, but not LLaVA
    ],
)
def test_other_json_is_not_taken_for_coco(tmp_path, content):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"other\.json: .*neither a LLaVA list nor COCO"):
        detect_format(path)


# ----------------------------------------------------------------------------------------------
# Missing paths and unknown formats
# ----------------------------------------------------------------------------------------------


def test_missing_path_is_a_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "data.tar"
    with pytest.raises(FileNotFoundError, match=r"nowhere/data\.tar: no such file"):
        detect_format(missing)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such file"):
        inspect_source(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no files match"):
        detect_format(str(tmp_path / "*.tar"))


def test_brace_ranges_are_detected_from_their_first_shard(tmp_path):
    (tmp_path / "t-0.jsonl").write_text('{"text": "a"}\n')
    assert detect_format(str(tmp_path / "t-{0..3}.jsonl")) == "text"
    with pytest.raises(FileNotFoundError, match=r"u-0\.jsonl"):
        detect_format(str(tmp_path / "u-{0..3}.jsonl"))


def test_shard_lists_expand_as_webdataset_expands_them(tmp_path):
    """Zero-padded ranges, several braces, lists: the shards webdataset would read, in order."""
    expand_urls = pytest.importorskip("webdataset.shardlists").expand_urls

    for pattern in (
        "s-{000..009}.tar",
        "s-{8..11}.tar",
        "s-{08..11}.tar",
        "s-{7..010}.tar",
        "{a,b}/s-{0..1}-{00..02}.tar",
        "plain.tar",
    ):
        assert catalog.expand_braces(pattern) == expand_urls(pattern), pattern
    assert catalog.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert catalog.expand_braces("odd{name.tar") == ["odd{name.tar"]  # unbalanced: literal
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(3):
            (tmp_path / d / f"s-{i:03d}.tar").write_bytes(b"")
    got = list_shards(str(tmp_path / "{a,b}" / "s-{000..001}.tar"), "wds")
    assert [f"{x.parent.name}/{x.name}" for x in got] == [
        "a/s-000.tar",
        "a/s-001.tar",
        "b/s-000.tar",
        "b/s-001.tar",
    ]


@pytest.mark.parametrize(
    "url", ["pipe:curl -s http://x/s-{000..009}.tar", "pipe:touch {marker}", "https://x/s.tar"]
)
def test_pipe_and_remote_urls_are_refused_naming_the_key(tmp_path, url, capsys):
    """WebDataset runs `pipe:` URLs as shell commands; sources are local files only."""
    from mm1.config import SourceConfig

    marker = tmp_path / "ran"
    url = url.replace("{marker}", str(marker))
    reason = "pipe: URLs run shell commands" if url.startswith("pipe:") else "remote URLs"
    with pytest.raises(DataError, match=reason):
        list_shards(url, "wds")
    with pytest.raises(DataError, match=reason):
        detect_format(url)
    with pytest.raises(DataError, match=rf"^data\.sources\[0\]\.path: .*{reason}"):
        catalog.check_sources([SourceConfig(format="wds", path=url)])
    assert cli.main(["data", "inspect", url]) != 0
    out = capsys.readouterr().out
    assert reason in out and len(out.strip().splitlines()) == 1, out
    assert not marker.exists()  # nothing was run


def test_unknown_format_is_a_data_error_naming_the_known_ones(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    for call in (
        lambda: inspect_source(tmp_path / "t.jsonl", "txt"),
        lambda: list_shards(tmp_path / "t.jsonl", "txt"),
        lambda: count_records(tmp_path / "t.jsonl", "txt"),
    ):
        with pytest.raises(DataError, match=r"unknown data format 'txt'.*wds, obelics.*coco"):
            call()
    with pytest.raises(ValueError):  # still a ValueError for callers that catch one
        list_shards(tmp_path / "t.jsonl", "txt")


def test_undetectable_files_are_data_errors(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "odd.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(DataError, match=r"notes\.csv: unknown data format.*give the format"):
        detect_format(tmp_path / "notes.csv")
    with pytest.raises(DataError, match=r"odd\.jsonl: unrecognised jsonl record keys"):
        detect_format(tmp_path / "odd.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no data files with a known extension"):
        detect_format(empty)


def test_cli_data_inspect_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    cases = [
        ([str(tmp_path / "nonexistent")], "nonexistent: no such file or directory"),
        ([str(tmp_path / "t.jsonl"), "--format", "txt"], "unknown data format 'txt'"),
    ]
    for args, message in cases:
        assert cli.main(["data", "inspect", *args]) == 2  # caught: no traceback
        out = capsys.readouterr().out
        assert "error:" in out and message in out and "Traceback" not in out
    assert cli.main(["data", "inspect", str(_coco(tmp_path)), "-n", "1"]) == 0
    assert '"format": "coco"' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Bad-record rate
# ----------------------------------------------------------------------------------------------


def test_error_rate_message_names_the_config_key():
    stats = ReadStats(records=90, skipped={"corrupt_image": 10})
    with pytest.raises(DataError) as err:
        check_error_rate(stats, 0.01, "web", min_seen=100)
    msg = str(err.value)
    assert "'web'" in msg and "10 of 100" in msg and "corrupt_image=10" in msg
    assert "data.max_error_rate=0.01 (1.0%)" in msg
    assert "raise data.max_error_rate in the config" in msg


def test_small_sources_are_still_checked():
    # 1 bad record in 11 (9%): within what 1% of the first 100 records allows, not judged yet.
    check_error_rate(ReadStats(records=10, skipped={"corrupt_image": 1}), 0.01, "s", min_seen=100)
    # A second bad record exceeds that budget, however few records were seen.
    stats = ReadStats(records=9, skipped={"corrupt_image": 2})
    with pytest.raises(DataError, match=r"'s': 2 of 11 records.*data\.max_error_rate=0\.01"):
        check_error_rate(stats, 0.01, "s", min_seen=100)
    # The threshold still keeps early noise from counting as a rate: 3 of 12 with a 20% limit.
    check_error_rate(ReadStats(records=9, skipped={"x": 3}), 0.2, "s", min_seen=100)
    # A whole pass can be judged on its own however small it is.
    with pytest.raises(DataError, match="9.1%"):
        check_error_rate(ReadStats(records=10, skipped={"x": 1}), 0.01, "s", min_seen=0)
