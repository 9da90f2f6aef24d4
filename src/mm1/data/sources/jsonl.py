"""JSON Lines files, read a line at a time with a bound: a line longer than the bound is read
through in chunks and dropped, never held whole (a 256 MB line would otherwise be read into
memory only to be skipped)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from mm1.data.sources.base import (
    MAX_JSON_DEPTH,
    ReadStats,
    json_line_limit,
    open_text,
    repair_record,
    skip_record,
    too_deep,
)
from mm1.data.sources.unicode import has_escaped_bytes

CHUNK = 1 << 20  # characters read at a time through a line over the bound


def bounded_lines(f: TextIO, limit: int) -> Iterator[str | None]:
    """Each line of `f` (with its newline), or None for a line of more than `limit` characters
    (its newline not counted); 0: no bound. A line is read in chunks: what is held at once is
    at most about `limit` characters, whatever the line's length."""
    if not limit:
        yield from f
        return
    while piece := f.readline(CHUNK):
        parts, size = [piece], len(piece)
        while not piece.endswith("\n") and size <= limit and (piece := f.readline(CHUNK)):
            parts.append(piece)
            size += len(piece)
        if size - piece.endswith("\n") <= limit:
            yield "".join(parts)
            continue
        parts.clear()  # over the bound: the rest is read through and dropped
        while not piece.endswith("\n") and (piece := f.readline(CHUNK)):
            pass
        yield None


def jsonl_records(path: Path, start: int, stats: ReadStats) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (record index, object) per non-blank line from `start` on; lines before `start` are
    not parsed. Malformed lines are skipped and counted (`malformed_json`), lines over
    `json_line_limit` too (`too_long_text`, never held whole); text that is not valid Unicode is
    repaired and counted (`invalid_utf8`, `lone_surrogate`)."""
    index = -1
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(bounded_lines(f, limit := json_line_limit()), 1):
                if line is not None and not line.strip():
                    continue
                index += 1
                if index < start:
                    continue
                # the line for an editor, the record index as the readers count records
                where = f"{path}:{lineno} (record {index})"
                if line is None:
                    why = f"a line over {limit:,} characters, read through without keeping it"
                    skip_record(stats, "too_long_text", where, why)
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:
                    why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                    skip_record(stats, "malformed_json", where, why)
                    continue
                if too_deep(obj):
                    why = f"nested deeper than {MAX_JSON_DEPTH} levels"
                    skip_record(stats, "malformed_json", where, why)
                    continue
                if not isinstance(obj, dict):
                    skip_record(stats, "malformed_record", where, "not a JSON object")
                    continue
                yield index, repair_record(stats, obj, where, has_escaped_bytes(line))
    except (EOFError, gzip.BadGzipFile, OSError, zlib.error) as e:  # zlib.error: a bad gzip body
        if isinstance(e, FileNotFoundError):
            raise
        skip_record(stats, "corrupt_file", str(path), f"stopped reading: {e}")
