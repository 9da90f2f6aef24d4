"""A large JSON list read record by record: one pass finds each element's byte span, and a
record is parsed only when it is read.

LLaVA-1.5's SFT file is a single ~1 GB JSON list. Parsed whole, it costs 3-4x its size in
Python objects in every loader worker (docs/benchmarks.md §6); indexed, a worker holds 16 bytes
per record and parses the records it reads. The pass parses every element once (so a file that
is not valid JSON is refused up front, as a whole-file parse would), keeps none of them, and
never holds more than a chunk of the file's text.
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mm1.data.sources.unicode import decode_utf8

_CHUNK_BYTES = 8 << 20
_SPACE = re.compile(r"[ \t\n\r]*")
_BOM = b"\xef\xbb\xbf"
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")
_NEAR_END = 16  # longer than anything cut short that still parses up to the cut: `\uXXXX`, `false`


class NotAList(ValueError):
    """The file is JSON, or starts like it, but its top level is not a list."""


class JsonList:
    """The elements of the JSON list in `path`, by index: `len`, `read(i)`, `records(start)`,
    `records_at(indices)`.

    Raises ValueError (with the position) when the file is not valid JSON, `NotAList` when its
    top level is not a list, and OSError when it cannot be read. Reading re-parses one element's
    bytes: text that is not UTF-8 comes back with lone surrogates, as `open_text` gives it, with
    a flag for the caller's repair; an element whose bytes no longer parse (the file was
    rewritten after it was indexed) comes back as None, which no reader takes for a record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spans = array("q")  # start, end byte offsets of each element, flattened
        self._scan()

    def __len__(self) -> int:
        return len(self._spans) // 2

    def span(self, i: int) -> tuple[int, int]:
        return self._spans[2 * i], self._spans[2 * i + 1]

    def read(self, i: int) -> tuple[Any, bool]:
        """Element `i` and whether its bytes held something that is not UTF-8."""
        with open(self.path, "rb") as f:
            return self._read(f, i)

    def records(self, start: int = 0) -> Iterator[tuple[int, Any, bool]]:
        """(index, element, invalid bytes) from `start` on, the file opened once."""
        return self.records_at(range(start, len(self)))

    def records_at(self, indices: Iterable[int]) -> Iterator[tuple[int, Any, bool]]:
        """(index, element, invalid bytes) for each of `indices`, the file opened once."""
        with open(self.path, "rb") as f:
            for i in indices:
                value, invalid = self._read(f, i)
                yield i, value, invalid

    def _read(self, f: Any, i: int) -> tuple[Any, bool]:
        lo, hi = self.span(i)
        f.seek(lo)
        text, invalid = decode_utf8(f.read(hi - lo))
        try:
            return json.loads(text), invalid
        except (ValueError, RecursionError):
            return None, invalid

    def _scan(self) -> None:
        with open(self.path, "rb") as f:
            scan = _Scanner(f)
            scan.skip_space()
            if scan.peek() == "":
                raise ValueError("Expecting value: the file is empty")
            if scan.peek() != "[":
                raise NotAList(f"the top level is not a list ({scan.where()})")
            scan.advance()
            scan.skip_space()
            if scan.peek() == "]":
                scan.advance()
            else:
                while True:
                    self._spans.extend(scan.element())
                    scan.skip_space()
                    if scan.peek() == "]":
                        scan.advance()
                        break
                    if scan.peek() != ",":
                        raise ValueError(f"Expecting ',' delimiter {scan.where()}")
                    scan.advance()
                    scan.skip_space()
                    if scan.peek() in ("]", ""):
                        raise ValueError(f"Expecting value {scan.where()}")
            scan.skip_space()
            if scan.peek() != "":
                raise ValueError(f"Extra data {scan.where()}")


class _Scanner:
    """A cursor over the file's text, read a chunk at a time: `text[i]` is at file offset
    `i_byte`, and the text before the cursor is dropped when a chunk is appended, so what is
    held stays about a chunk (or one element) long."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.i_byte = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
        f.seek(self.i_byte)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.decoder = json.JSONDecoder()
        self.text, self.i, self.eof = "", 0, False

    def more(self) -> bool:
        """Append the next chunk (dropping the text before the cursor); False at the end."""
        if self.eof:
            return False
        chunk = self.f.read(_CHUNK_BYTES)
        self.eof = not chunk
        self.text = self.text[self.i :] + self.utf8.decode(chunk, final=self.eof)
        self.i = 0
        return True

    def peek(self) -> str:
        """The character at the cursor ('' at the end of the file)."""
        while self.i >= len(self.text):
            if not self.more():
                return ""
        return self.text[self.i]

    def _bytes(self, end: int) -> int:
        """UTF-8 length of the text from the cursor to `end`."""
        return len(self.text[self.i : end].encode("utf-8", "surrogateescape"))

    def advance(self, end: int | None = None) -> None:
        """Move the cursor to `end` (default: one character on)."""
        end = self.i + 1 if end is None else end
        self.i_byte += self._bytes(end)
        self.i = end

    def skip_space(self) -> None:
        while True:
            self.advance(_SPACE.match(self.text, self.i).end())  # type: ignore[union-attr]
            if self.i < len(self.text) or not self.more():
                return

    def where(self, pos: int | None = None) -> str:
        return f"at byte {self.i_byte + (0 if pos is None else self._bytes(pos))}"

    def element(self) -> tuple[int, int]:
        """Parse the element at the cursor, reading on while it runs past the text held, and
        move past it; returns its byte span."""
        while True:
            try:
                _, end = self.decoder.raw_decode(self.text, self.i)
            except json.JSONDecodeError as e:
                # An element cut off by the chunk's end fails near the end of the text (an
                # unterminated string fails at its start, however long it is); elsewhere the
                # error is real.
                cut = e.pos >= len(self.text) - _NEAR_END or e.msg.startswith("Unterminated")
                if cut and self.more():
                    continue
                raise ValueError(f"{e.msg} {self.where(e.pos)}") from None
            except RecursionError:
                raise ValueError(f"nested too deeply {self.where()}") from None
            if _NUMBER_TAIL.fullmatch(self.text, end) and self.more():
                continue  # a number cut off by the chunk's end parses as its prefix
            start = self.i_byte
            self.advance(end)
            return start, self.i_byte
