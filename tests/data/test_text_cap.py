"""`data.max_text_chars`: a record with more text than the cap is skipped and counted before
the tokenizer sees it (a gzip-bombed line would otherwise cost it tens of GB)."""

from __future__ import annotations

import json

import pytest

from mm1.config import ConfigError, DataConfig, SourceConfig, load_config, to_dict
from mm1.data.caption_pairs import CaptionPairDataset, PairSettings
from mm1.data.document import Conversation, Document
from mm1.data.images import ImageProcessor
from mm1.data.loader import LoaderSettings, PackedDataset, loader_counts, packing_stats
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import DataError
from mm1.data.tokenizer import Tokenizer
from mm1.data.world import world_sources
from mm1.train.config_change import config_diff, current_shape


def _text_source(path, texts: list[str]) -> list[SourceConfig]:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [SourceConfig(format="text", path=str(path), kind="text")]


def _stats(tok, sources, cap: int, error_rate: float = 0.01) -> dict:
    s = LoaderSettings(sources, 64, 1, PromptFormat(4), max_text_chars=cap)
    s.max_error_rate = error_rate
    return packing_stats(s, tok, 12)


def test_text_over_the_cap_is_skipped_unread_by_the_tokenizer(tok, tmp_path, monkeypatch):
    texts = [f"a red cube number {i} sits on the mat." for i in range(40)]
    texts[7] = "zebra " * 200  # 1,200 characters
    sources = _text_source(tmp_path / "t.jsonl", texts)
    seen: list[int] = []
    encode = Tokenizer._encode_with_offsets
    monkeypatch.setattr(
        Tokenizer, "_encode_with_offsets", lambda self, t: seen.append(len(t)) or encode(self, t)
    )
    capped = _stats(tok, sources, cap=1000, error_rate=0.5)  # 1 of 40
    assert set(capped["read"]["skipped"]) == {"too_long_text"}
    assert max(seen) < 100  # the long record never reached the tokenizer
    seen.clear()
    assert _stats(tok, sources, cap=0)["read"]["skipped"] == {}  # 0: no cap
    assert max(seen) >= 1200


def test_the_training_metrics_count_skips_by_reason(tok, tmp_path):
    """metrics.jsonl's `skipped_records` (all reasons) comes with one count per reason."""
    texts = [f"a red cube number {i} sits on the mat." for i in range(40)]
    texts[3] = "zebra " * 200
    sources = _text_source(tmp_path / "t.jsonl", texts)
    s = LoaderSettings(sources, 64, 1, PromptFormat(4), max_text_chars=1000)
    s.max_error_rate = 0.5
    ds = PackedDataset(s, tok, ImageProcessor.clip(16))
    it = iter(ds)
    for _ in range(12):  # past the long record
        next(it)
    counts = loader_counts(ds.state_dict())
    assert counts["skipped_too_long_text"] == counts["skipped_records"] >= 1
    assert not any(k.startswith("skipped_") and v == 0 for k, v in counts.items())


def test_a_source_of_long_texts_names_the_setting_to_raise(tok, tmp_path):
    sources = _text_source(tmp_path / "long.jsonl", ["word " * 50] * 10)
    with pytest.raises(DataError, match=r"too_long_text=\d+.*raise data\.max_text_chars"):
        _stats(tok, sources, cap=100)
    assert _stats(tok, sources, cap=250)["read"]["skipped"] == {}  # at the cap: kept


def test_caption_pairs_skip_captions_over_the_cap(world, tok):
    train, _ = world_sources(world)
    captions = [s for s in train if s.resolved_kind == "captions"]
    base = {"sources": captions, "batch_size": 4, "max_len": 16, "needs_text": True}
    ds = CaptionPairDataset(PairSettings(**base), tok, ImageProcessor.clip(16))
    next(iter(ds))  # the world's captions fit the default cap
    ds = CaptionPairDataset(PairSettings(**base, max_text_chars=5), tok, ImageProcessor.clip(16))
    with pytest.raises(DataError, match=r"too_long_text.*raise data\.max_text_chars"):
        next(iter(ds))


def test_text_chars_counts_what_the_tokenizer_would_read() -> None:
    doc = Document("d", "interleaved", ["ab", object(), "cde"])  # type: ignore[list-item]
    assert doc.text_chars == 5
    conv = Conversation(
        "c", [], [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": 3}]
    )
    assert conv.text_chars == 9  # a non-text content is refused later, as untokenizable


def test_the_cap_is_validated_and_old_runs_resume_with_any() -> None:
    with pytest.raises(ConfigError, match="data.max_text_chars=-1"):
        load_config(None, ["data.max_text_chars=-1"])
    cfg = load_config(None, [])
    saved = to_dict(cfg)
    del saved["data"]["max_text_chars"]  # as runs wrote it before the key
    assert config_diff(current_shape(saved), to_dict(cfg)) == []
    assert cfg.data.max_text_chars == DataConfig.max_text_chars
    # such a run never chose a cap: it may resume with none (its old behaviour) or any other
    uncapped = to_dict(load_config(None, ["data.max_text_chars=0"]))
    assert config_diff(current_shape(saved, uncapped), uncapped) == []


def test_a_wds_text_member_too_large_for_the_cap_is_skipped_unread(tmp_path, monkeypatch):
    """A caption member with more than 4 bytes per character of the cap holds more text than
    the cap admits: it is skipped from its tar header, never read into memory. A json member
    is not judged by its size (it holds metadata the cap does not count), nor is a second
    caption member the sample does not use."""
    from mm1.data.sources import wds
    from mm1.data.sources.base import DEFAULT_MAX_TEXT_CHARS, ReadStats, set_max_text_chars
    from tests.data.shards import wds_members, write_tar

    assert DataConfig().max_text_chars == DEFAULT_MAX_TEXT_CHARS
    members = wds_members(4)
    members[1] = (members[1][0], b"x" * 4001)  # sample 0's caption: over 4 x 1,000 bytes
    members[4] = (members[4][0], b"y" * 4000)  # sample 1's: at most 4,000 chars, read
    members[8] = (members[8][0], json.dumps({"exif": "z" * 5000}).encode())  # sample 2's json
    members.append(("000000003.caption", b"w" * 5000))  # unused: sample 3 has a .txt
    write_tar(tmp_path / "s.tar", members)
    read_sizes: list[int] = []
    real = wds.tarfile.TarFile.extractfile

    def extractfile(self, member):
        read_sizes.append(member.size)
        return real(self, member)

    monkeypatch.setattr(wds.tarfile.TarFile, "extractfile", extractfile)
    set_max_text_chars(1000)
    stats = ReadStats()
    docs = list(wds.read_wds_shard(tmp_path / "s.tar", stats=stats))
    assert [d.id for d in docs] == [f"{i:09d}" for i in (1, 2, 3)] and 4001 not in read_sizes
    assert stats.skipped == {"too_long_text": 1}  # sample 1 is skipped later, by the loader
    set_max_text_chars(0)  # no cap: read as before
    assert len(list(wds.read_wds_shard(tmp_path / "s.tar"))) == 4


@pytest.mark.parametrize("chunk", [1 << 20, 3, 1])
def test_bounded_lines_drop_only_the_lines_over_the_bound(monkeypatch, chunk: int) -> None:
    import io

    from mm1.data.sources import jsonl

    monkeypatch.setattr(jsonl, "CHUNK", chunk)  # lines read in one piece, or in several
    text = "abc\n" + "x" * 10 + "\n" + "y" * 11 + "\nlast" + "\n\n" + "w" * 10 + "\n" + "z" * 11
    got = list(jsonl.bounded_lines(io.StringIO(text), 10))
    assert got == ["abc\n", "x" * 10 + "\n", None, "last\n", "\n", "w" * 10 + "\n", None]
    assert list(jsonl.bounded_lines(io.StringIO("end" * 3), 10)) == ["endendend"]
    assert list(jsonl.bounded_lines(io.StringIO(text), 0)) == io.StringIO(text).readlines()


def test_a_jsonl_line_over_the_bound_is_skipped_without_holding_it(tmp_path) -> None:
    """A JSON Lines line of more than 12 characters per character of the cap (JSON's most per
    character of text) is counted as `too_long_text` and read through in chunks: a gzip bomb
    of a 64 MB line (64 kB on disk) never exists as one string. Its neighbours are read, and
    the record indices and the LLaVA record count still count it."""
    import gzip
    import tracemalloc

    from mm1.data.sources.base import ReadStats, set_max_text_chars
    from mm1.data.sources.jsonl import jsonl_records
    from mm1.data.sources.llava import count_llava_records

    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "first"}) + "\n")
        f.write('{"text": "' + "a" * (64 << 20) + '"}\n')
        f.write(json.dumps({"text": "third"}) + "\n")
    set_max_text_chars(1000)
    stats = ReadStats()
    tracemalloc.start()
    try:
        records = list(jsonl_records(path, 0, stats))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert records == [(0, {"text": "first"}), (2, {"text": "third"})]
    assert stats.skipped == {"too_long_text": 1} and peak < 16 << 20  # the line: 64 MB
    assert count_llava_records(path) == 3
    assert list(jsonl_records(path, 2, ReadStats())) == [(2, {"text": "third"})]


def test_a_parquet_row_over_the_cap_is_skipped_before_it_becomes_python(tmp_path, monkeypatch):
    """A parquet row whose text column (a string, or OBELICS' list of strings) holds more than
    4 bytes per character of the cap is counted as `too_long_text` from Arrow's lengths and
    never converted to python strings; its neighbours are read with their own row indices,
    and a resume from inside a batch still skips it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mm1.data.sources import base
    from mm1.data.sources.base import ReadStats, set_max_text_chars
    from mm1.data.sources.interleaved import read_obelics_parquet
    from mm1.data.sources.text import read_text

    texts = ["first", "a" * 4001, None, "é" * 1000, "last"]  # é: 2000 bytes, 1000 characters
    pq.write_table(
        pa.table({"text": texts, "id": list(range(5)), "note": ["z" * 9000] * 5}),
        tmp_path / "t.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "images": [[None, None], [None, None], [None]],
                "texts": [["ok", "fine"], ["b" * 2001, "c" * 2000], ["end"]],
            }
        ),
        tmp_path / "o.parquet",
    )
    converted: list[int] = []
    real = base._batch_dict

    def spy(batch):
        data, invalid = real(batch)
        converted.extend(len(t or "") for t in data.get("text", []))
        converted.extend(sum(len(t or "") for t in ts) for ts in data.get("texts", []))
        return data, invalid

    monkeypatch.setattr(base, "_batch_dict", spy)
    set_max_text_chars(1000)
    stats = ReadStats()
    docs = list(read_text(tmp_path / "t.parquet", stats=stats))
    assert [d.meta["__index__"] for d in docs] == [0, 3, 4]  # the other fields are not counted
    assert stats.skipped == {"too_long_text": 1, "empty_document": 1} and max(converted) == 1000
    assert [d.meta["__index__"] for d in read_text(tmp_path / "t.parquet", start=1)] == [3, 4]
    converted.clear()
    stats = ReadStats()
    docs = list(read_obelics_parquet(tmp_path / "o.parquet", stats=stats))
    assert [d.parts for d in docs] == [["ok", "fine"], ["end"]] and max(converted) == 6
    assert stats.skipped == {"too_long_text": 1}
    set_max_text_chars(0)  # no cap: every row converted, as before
    assert len(list(read_text(tmp_path / "t.parquet"))) == 4
