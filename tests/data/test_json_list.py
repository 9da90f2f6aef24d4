"""`JsonList`: a JSON list indexed by element byte spans, against `json.loads` of the whole file,
at chunk sizes that cut elements, multi-byte characters and numbers anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mm1.data.sources import json_list
from mm1.data.sources.json_list import JsonList, NotAList

ELEMENTS = [
    {"id": "a", "conversations": [{"from": "human", "value": "<image>\nWhat is [this] {x}?"}]},
    'quotes " and \\ and ] and } and , inside',
    "é 漢字 😀 ﬁ",  # 2-, 3- and 4-byte UTF-8
    "\ud800 a lone surrogate as a JSON escape",
    12345678901234567890,
    -1.5e10,
    0,
    True,
    None,
    [],
    {},
    [[1, [2, [3]]], {"k": [{}]}],
]


@pytest.fixture(params=[1, 3, 7, 64, 1 << 20])
def chunk(request, monkeypatch) -> int:
    monkeypatch.setattr(json_list, "_CHUNK_BYTES", request.param)
    return request.param


def _text(separators: tuple[str, str], indent: int | None) -> str:
    text = json.dumps(ELEMENTS, separators=separators, indent=indent, ensure_ascii=False)
    return text.replace("\ud800", "\\ud800")  # the only way JSON text holds a lone surrogate


@pytest.mark.parametrize(
    "text",
    [
        _text((",", ":"), None),
        _text((", ", ": "), None),
        " \n" + _text((",", ": "), 2) + "\n\n",
        "\ufeff" + _text((",", ":"), None),  # a BOM, as Windows tools write
    ],
    ids=["compact", "spaced", "indented", "bom"],
)
def test_every_element_equals_the_whole_parse(tmp_path: Path, chunk: int, text: str) -> None:
    path = tmp_path / "l.json"
    path.write_text(text, encoding="utf-8")
    expected = json.loads(text.removeprefix("\ufeff"))
    items = JsonList(path)
    assert len(items) == len(expected)
    raw = path.read_bytes()
    for i, value in enumerate(expected):
        assert items.read(i) == (value, False)
        lo, hi = items.span(i)
        assert json.loads(raw[lo:hi]) == value  # the span is exactly the element's bytes
    assert [(i, v) for i, v, _ in items.records(5)] == list(enumerate(expected))[5:]
    assert [(i, v) for i, v, _ in items.records_at([7, 2])] == [(7, expected[7]), (2, expected[2])]


@pytest.mark.parametrize("text", ["[]", "[ ]", " [\n] \n", "[1]", '["x"]'])
def test_small_lists(tmp_path: Path, chunk: int, text: str) -> None:
    (tmp_path / "l.json").write_text(text)
    items = JsonList(tmp_path / "l.json")
    assert [v for _, v, _ in items.records()] == json.loads(text)


BAD = ["", "   ", "[", "[1,]", "[,1]", "[1 2]", "[1]x", "[1]]", '["a]', "[{]", "[1,,2]", "[tru]"]
BAD += ["[01]", '[{"a" 1}]', "[1, 2, 3", '["a", "b"', "[1,\n2,\n x]"]


@pytest.mark.parametrize("text", BAD)
def test_refuses_what_json_refuses(tmp_path: Path, chunk: int, text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    (tmp_path / "l.json").write_text(text)
    with pytest.raises(ValueError) as e:
        JsonList(tmp_path / "l.json")
    assert not isinstance(e.value, NotAList)


@pytest.mark.parametrize("text", ["{}", '{"a": [1]}', '"x"', "3", " null"])
def test_a_top_level_that_is_not_a_list(tmp_path: Path, text: str) -> None:
    json.loads(text)
    (tmp_path / "l.json").write_text(text)
    with pytest.raises(NotAList):
        JsonList(tmp_path / "l.json")


def test_an_error_names_its_byte(tmp_path: Path, chunk: int) -> None:
    text = "[" + ", ".join(str(i) for i in range(200)) + ", x, 7]"
    (tmp_path / "l.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    with pytest.raises(ValueError, match=r"^Expecting value at byte (\d+)$") as e:
        JsonList(tmp_path / "l.json")
    assert int(re.search(r"\d+$", str(e.value)).group()) == ref.value.pos


def test_bytes_that_are_not_utf8_are_flagged_per_element(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "l.json"
    path.write_bytes(b'["ok", "bad \xff byte", "\xc3\xa9 ok"]')
    items = JsonList(path)
    assert items.read(0) == ("ok", False)
    assert items.read(1) == ("bad \udcff byte", True)  # as open_text's surrogateescape gives it
    assert items.read(2) == ("é ok", False)


def test_the_text_held_stays_about_a_chunk(tmp_path: Path, monkeypatch) -> None:
    """The pass never holds the file: at most the unread rest of one chunk and the next one, or
    one element that is longer."""
    monkeypatch.setattr(json_list, "_CHUNK_BYTES", 64)
    held: list[int] = []
    more = json_list._Scanner.more

    def recording(self) -> bool:
        grew = more(self)
        held.append(len(self.text))
        return grew

    monkeypatch.setattr(json_list._Scanner, "more", recording)
    elements = [{"i": i, "text": "word " * (i % 7)} for i in range(2000)] + ["x" * 500]
    path = tmp_path / "l.json"
    path.write_text(json.dumps(elements))
    assert len(JsonList(path)) == len(elements)
    assert path.stat().st_size > 50_000 and len(held) > 500
    assert max(held) <= 2 * 64 + 502


def test_an_element_rewritten_after_indexing_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    path.write_text('[{"a": 1}, {"b": 2}]')
    items = JsonList(path)
    path.write_text('[{"a": 1}, {"b": 2')  # cut short after indexing
    assert items.read(0) == ({"a": 1}, False)
    assert items.read(1) == (None, False)
