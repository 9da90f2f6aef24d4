"""What every reader shares: file-extension conventions, errors, read statistics and
rate-limited warnings, image decoding, and iteration over parquet rows and JSONL records
(resumable from a record index)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mm1.data.sources.decode import IMAGE_ERRORS, OversizeImage, decode_image, is_oversize
from mm1.data.sources.json_list import JsonList
from mm1.data.sources.unicode import has_escaped_bytes, repair_value

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
# what a WebDataset member may be named to hold the image (PIL decodes each of them)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
CAPTION_EXTS = ("txt", "caption")


class DataError(RuntimeError):
    """A data source is unusable (too many bad records, a malformed file)."""


class UnknownFormatError(DataError, ValueError):
    """A data format that is not one of the known ones, or that cannot be told from the files.

    A `DataError` (reported as a one-line error by the CLI) and, as it used to be, a
    `ValueError`."""


# ----------------------------------------------------------------------------------------------
# Statistics and warnings
# ----------------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What readers saw: `records` yielded, `images` decoded, `skipped` records per reason,
    and records kept after a repair (`repaired`, per reason: not errors, so not in the rate)."""

    records: int = 0
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_images: int = 0  # bad images left out of kept documents (`drop_bad_images=True`)
    repaired: dict[str, int] = field(default_factory=dict)
    oversize_images: int = 0  # decoded reduced: over the pixel cap (`data.max_image_pixels`)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def repair(self, reason: str, n: int = 1) -> None:
        self.repaired[reason] = self.repaired.get(reason, 0) + n

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def seen(self) -> int:
        """Records yielded plus records skipped."""
        return self.records + self.num_skipped

    @property
    def error_rate(self) -> float:
        """Skipped records as a fraction of all records seen (0.0 when nothing was seen)."""
        return self.num_skipped / self.seen if self.seen else 0.0

    def merge(self, other: ReadStats) -> ReadStats:
        """Add `other`'s counts into this one (in place); returns self."""
        self.records += other.records
        self.images += other.images
        self.dropped_images += other.dropped_images
        self.oversize_images += other.oversize_images
        for reason, n in other.skipped.items():
            self.skip(reason, n)
        for reason, n in other.repaired.items():
            self.repair(reason, n)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "images": self.images,
            "skipped": dict(sorted(self.skipped.items())),
            "dropped_images": self.dropped_images,
            "repaired": dict(sorted(self.repaired.items())),
            "oversize_images": self.oversize_images,
            "error_rate": self.error_rate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadStats:
        return cls(
            int(d["records"]),
            int(d.get("images", 0)),
            dict(d.get("skipped", {})),
            int(d.get("dropped_images", 0)),
            dict(d.get("repaired", {})),
            int(d.get("oversize_images", 0)),
        )


# Records a streaming reader sees before `check_error_rate` judges its rate (tiny samples are
# noisy); the loader and the mixture pass it while a source is still being read.
MIN_SEEN_RECORDS = 100


def check_error_rate(
    stats: ReadStats, max_error_rate: float, source: str, min_seen: int = 0
) -> None:
    """Raise `DataError` naming `source` when more than `max_error_rate` of its records were bad.

    `max_error_rate` is the config's `data.max_error_rate` (a fraction), which the message names.

    The rate is not judged before `min_seen` records were seen (tiny samples are noisy: one bad
    first record is not a 100% error rate). Before then the check still fails as soon as more
    records were skipped than `max_error_rate` allows in `min_seen` records, since the verdict at
    `min_seen` is then already certain. So a small source, or a short run, that never reaches
    `min_seen` records is still checked: with a 1% rate and `min_seen=MIN_SEEN_RECORDS` (100, what
    the streaming readers pass) two bad records abort. The default `min_seen=0` judges the rate
    however few records were seen, as callers at the end of a whole pass over a source want.
    """
    if stats.seen == 0:
        return
    if stats.seen < min_seen:
        if stats.num_skipped <= max_error_rate * min_seen:
            return
    elif stats.error_rate <= max_error_rate:
        return
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
    most = max(stats.skipped, key=lambda k: stats.skipped[k])
    fix = (
        f"Most were {most}: {CONFIG_REMEDIES[most]}"
        if most in CONFIG_REMEDIES
        else "Fix or remove the bad shards"
    )
    raise DataError(
        f"data source {source!r}: {stats.num_skipped} of {stats.seen} records were skipped "
        f"({stats.error_rate:.1%}; {reasons}), more than data.max_error_rate={max_error_rate:g} "
        f"({max_error_rate:.1%}) allows. {fix}, or raise data.max_error_rate in the config (a "
        "fraction of the records read)."
    )


# The text cap (`data.max_text_chars`), process-wide like the pixel cap: the loader sets it in
# each worker. Readers use it to skip, unread, a member that must hold more text than that.
DEFAULT_MAX_TEXT_CHARS = 4_000_000
_max_text_chars = DEFAULT_MAX_TEXT_CHARS


def set_max_text_chars(n: int) -> None:
    """Cap on a record's characters of text (0 = no cap)."""
    global _max_text_chars
    if n < 0:
        raise ValueError(f"max_text_chars={n} must be >= 0 (0 = no cap)")
    _max_text_chars = int(n)


def over_text_cap(num_bytes: int) -> bool:
    """Whether `num_bytes` of UTF-8 text hold more characters than the text cap: a character
    takes at most 4 bytes (an undecodable byte is one character), so such text is over the
    cap unless stripping its leading and trailing whitespace brings it under."""
    return bool(_max_text_chars) and num_bytes > 4 * _max_text_chars


def json_line_limit() -> int:
    """The longest JSON Lines line read (0: any): at most 12 characters per character of text
    (`\\uXXXX` twice), so a longer one is over the text cap unless mostly other fields."""
    return 12 * _max_text_chars


# Skips that the config causes rather than the data: the setting that admits such records.
CONFIG_REMEDIES = {
    "too_long": "raise data.seq_len (an image's token block, or a conversation's first answer, "
    "does not fit in it; a high-resolution layout takes more tokens per image)",
    "too_many_images": "raise data.max_images_per_seq",
    "oversize_image": "raise data.max_image_pixels",
    "too_long_text": "raise data.max_text_chars",
}


_WARN_FIRST = 5
_warn_counts: Counter[str] = Counter()


def reset_warning_counts() -> None:
    """Forget how many warnings were logged (they are rate-limited per reason and process)."""
    _warn_counts.clear()


def skip_record(stats: ReadStats, reason: str, where: str, detail: str = "") -> None:
    """Count a skipped record and log a warning."""
    stats.skip(reason)
    warn_skip(reason, where, detail)


def warn_skip(reason: str, where: str, detail: str = "", action: str = "skipped") -> None:
    """Log a warning: the first 5 per reason (per process), then only at powers of 2."""
    _warn_counts[f"{action}:{reason}"] += 1
    n = _warn_counts[f"{action}:{reason}"]
    if n <= _WARN_FIRST or n & (n - 1) == 0:
        detail = " ".join(detail.split())  # one line per warning, whatever the error said
        more = (
            f" [{n} '{reason}' so far; further ones are rate-limited]" if n >= _WARN_FIRST else ""
        )
        logger.warning(
            "%s %s: %s%s%s", action, where, reason, f" ({detail})" if detail else "", more
        )


def repair_record(stats: ReadStats, value: Any, where: str, invalid_bytes: bool = False) -> Any:
    """`value` with its bad text repaired (see `mm1.data.sources.unicode`), each reason counted
    once for the record and logged with `where`."""
    value, reasons = repair_value(value, invalid_bytes)
    for reason in sorted(reasons):
        stats.repair(reason)
        warn_skip(reason, where, "replaced with U+FFFD", action="repaired")
    return value


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def load_image_file(path: Path) -> Image.Image:
    return decode_image(path.read_bytes(), str(path))


class BadImage(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _image_error_reason(err: Exception) -> str:
    """The skip reason of an image that failed to decode: refused for its size, or corrupt."""
    return "oversize_image" if isinstance(err, OversizeImage) else "corrupt_image"


def image_from_path(path: Path) -> Image.Image:
    try:
        found = path.is_file()
    except OSError as e:  # a name too long for the OS: python 3.11 raises instead of False
        raise BadImage("missing_image", f"cannot look up {str(path)[:200]}: {e.strerror}") from None
    if not found:
        # a folder given for an image (`--image DIR`) is not a missing file
        what = f"{path} is a directory, not an image file" if path.is_dir() else f"no file {path}"
        raise BadImage("missing_image", what)
    try:
        return load_image_file(path)
    except IMAGE_ERRORS as e:
        detail = str(e)
        reason = _image_error_reason(e)
        raise BadImage(reason, detail if str(path) in detail else f"{path}: {e}") from None


def resolve_image_path(root: Path, name: str, allow_outside: bool = False) -> Path:
    """Where a record's image path points: `name` under `root`.

    A path that lexically leaves `root` — absolute, or climbing out with `..` once normalised —
    raises `BadImage` (`absolute_path`, `path_outside_root`) unless `allow_outside`: a record
    must not make training read any file it names. The check is on the text of the path, not
    the resolved file, so symlinked folders inside `root` keep working."""
    if os.path.isabs(name):
        if allow_outside:
            return Path(name)
        raise BadImage(
            "absolute_path",
            f"{name!r} is absolute; set allow_absolute_paths: true on the source to read it",
        )
    norm = os.path.normpath(name)
    climbs_out = norm == os.pardir or norm.startswith(os.pardir + os.sep)
    if climbs_out and not allow_outside:
        raise BadImage(
            "path_outside_root",
            f"{name!r} leaves the image root {root}; set allow_absolute_paths: true on the "
            "source to read it",
        )
    # The normalised path is what was checked: the OS would follow `link/..` out of the root.
    return root / norm


def image_from_bytes(data: bytes, name: str = "", max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes held in a record; `name` (the file and position) goes into errors.
    `max_pixels`: as `decode_image`'s (None: the readers' limit)."""
    try:
        return decode_image(bytes(data), name, max_pixels)
    except IMAGE_ERRORS as e:
        raise BadImage(_image_error_reason(e), str(e)) from None


def count_images(stats: ReadStats, images: Iterable[Any]) -> None:
    """Count the images a kept record brings, and those decoded reduced by the pixel cap."""
    for im in images:
        if isinstance(im, Image.Image):
            stats.images += 1
            stats.oversize_images += is_oversize(im)


def default_image_dir(data_path: Path) -> Path:
    images = data_path.parent / "images"
    return images if images.is_dir() else data_path.parent


# ----------------------------------------------------------------------------------------------
# Parquet and JSONL row iteration
# ----------------------------------------------------------------------------------------------


def parquet_rows(
    path: Path,
    columns: list[str],
    start: int,
    stats: ReadStats,
    required: tuple[str, ...],
    batch_size: int = 256,
    text_columns: tuple[str, ...] = (),
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row index, {column: value}) from `start` on; whole row groups before `start` are
    skipped without being read. A row whose `text_columns` (strings, or lists of them) hold
    more UTF-8 bytes than the text cap allows is skipped as `too_long_text` before its values
    become python objects (a 256 MB string would take up to 1 GB as one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        skip_record(stats, "corrupt_file", str(path), str(e))
        return
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: parquet file lacks column(s) {missing}; it has {names}")
    cols = [c for c in columns if c in names]
    group_start = 0
    try:
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if group_start + n <= start:
                group_start += n
                continue
            row = group_start
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[rg], columns=cols):
                first, row = row, row + batch.num_rows
                if row <= start:
                    continue
                offset = max(0, start - first)
                rows = batch.slice(offset)
                text_bytes = _text_bytes(rows, text_columns)
                kept = [k for k in range(rows.num_rows) if not over_text_cap(text_bytes[k])]
                for k in sorted(set(range(rows.num_rows)) - set(kept)):
                    where, detail = f"{path}: row {first + offset + k}", f"{text_bytes[k]:,} bytes"
                    skip_record(stats, "too_long_text", where, f"{detail} of text")
                if len(kept) < rows.num_rows:
                    rows = rows.take(pa.array(kept, pa.int64()))
                data, invalid = _batch_dict(rows)
                for j, k in enumerate(kept):
                    where = f"{path}: row {first + offset + k}"
                    rec = repair_record(stats, {c: data[c][j] for c in cols}, where, invalid)
                    yield first + offset + k, rec
            group_start += n
    except (pa.ArrowException, OSError) as e:
        skip_record(stats, "corrupt_file", str(path), f"stopped reading: {e}")


def _text_bytes(batch: Any, columns: tuple[str, ...]) -> list[int]:
    """Per row of an Arrow record batch, the UTF-8 bytes of its `columns` that hold strings or
    lists of strings (nulls count 0), computed in Arrow without making python strings."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    total = np.zeros(batch.num_rows, dtype=np.int64)
    strings = (pa.types.is_string, pa.types.is_large_string)
    for name in columns:
        if name not in batch.schema.names:
            continue
        col, kind = batch.column(name), batch.schema.field(name).type
        if any(is_str(kind) for is_str in strings):
            total += pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and any(
            is_str(kind.value_type) for is_str in strings
        ):
            lengths = pc.binary_length(pc.list_flatten(col)).fill_null(0)
            rows = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
            np.add.at(total, rows, lengths.to_numpy(zero_copy_only=False))
    return total.tolist()


def _batch_dict(batch: Any) -> tuple[dict[str, list[Any]], bool]:
    """A record batch as python lists, and whether its strings held bytes that are not UTF-8.

    Arrow does not validate strings it reads, and python's strict decode of a bad one would
    abort the whole file; such a batch is re-read with its string columns as binary, decoded
    with surrogateescape, for `repair_record` to count and replace per row."""
    import pyarrow as pa

    try:
        return batch.to_pydict(), False
    except UnicodeDecodeError:
        pass
    fields = [pa.field(f.name, _binary_strings(f.type)) for f in batch.schema]
    raw = batch.cast(pa.schema(fields)).to_pydict()
    return {f.name: [_decode_strings(v, f.type) for v in raw[f.name]] for f in batch.schema}, True


def _binary_strings(t: Any) -> Any:
    """Arrow type `t` with every string type replaced by binary (lists and structs followed)."""
    import pyarrow as pa

    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_list(t):
        return pa.list_(_binary_strings(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_binary_strings(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _binary_strings(f.type)) for f in t])
    return t


def _decode_strings(value: Any, t: Any) -> Any:
    """Decode the values that arrow type `t` (the column's own) holds as strings; binary values
    (image bytes) stay bytes."""
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return value.decode("utf-8", errors="surrogateescape")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_decode_strings(v, t.value_type) for v in value]
    if pa.types.is_struct(t):
        return {f.name: _decode_strings(value.get(f.name), f.type) for f in t}
    return value


def open_text(path: Path) -> io.TextIOBase:
    """A UTF-8 text stream (a leading BOM, as Windows tools write, left out); bytes that are not
    UTF-8 come as lone surrogates (surrogateescape), which `repair_record` counts as
    `invalid_utf8` and replaces. A UTF-16 file is refused (`refuse_utf16`)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        refuse_utf16(f.read(2), path)
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape")  # type: ignore[return-value]


def refuse_utf16(head: bytes, path: Path) -> None:
    """A `DataError` for a file that starts with a UTF-16 byte-order mark (as Windows tools
    save "Unicode" text): read as UTF-8, every line or the whole file would be malformed JSON,
    and the message would not say why."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f"{str(path)[:300]}: UTF-16 text (it starts with a UTF-16 byte-order mark); mm1 "
            "reads UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8 IN > OUT"
        )


# Deeper JSON is no real record; python's parser (and any recursive walk) would hit the
# recursion limit on it, so such records are refused up front.
MAX_JSON_DEPTH = 100


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON-like value nests lists / dicts more than `limit` levels (no recursion)."""
    level: list[Any] = [value]  # the containers at one depth, the root's being 1
    for _ in range(limit):
        level = [
            x
            for v in level
            if isinstance(v, (dict, list))
            for x in (v.values() if isinstance(v, dict) else v)
            if isinstance(x, (dict, list))
        ]
        if not level:
            return False
    return True


def load_json_file(path: Path) -> tuple[Any, bool]:
    """A whole JSON file and whether it held bytes that are not UTF-8 (kept as surrogates: the
    caller repairs record by record with `repair_record`, so each bad record is counted).
    Raises ValueError when it is not JSON, `DataError` naming the file when it cannot be read
    (a directory, a symlink loop); a missing file raises FileNotFoundError."""
    try:
        with open_text(path) as f:
            raw = f.read()
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{str(path)[:300]}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(raw), has_escaped_bytes(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# Whole-file JSON parsed in this process, by resolved path: (fingerprint, parsed, invalid).
_PARSED_JSON: dict[str, tuple[tuple[Any, ...], Any, bool]] = {}
# Below this size a file's fingerprint includes a hash of its bytes: a small file rewritten in
# place at the same size within the filesystem's timestamp tick (a few ms) is still noticed.
# Writing a larger file takes longer than a tick, so its size and times tell a rewrite.
_HASH_BELOW = 64 << 20


def _fingerprint(path: Path, st: os.stat_result) -> tuple[Any, ...]:
    fp: tuple[Any, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if st.st_size < _HASH_BELOW:
        fp += (hashlib.blake2b(path.read_bytes(), digest_size=16).digest(),)
    return fp


def load_json_file_once(path: Path) -> tuple[Any, bool]:
    """`load_json_file`, parsed once per process while the file is unchanged. A data slot opens
    its file at every epoch and re-reads buffered records on a resume, and a record count
    parses it too; an SFT file of a gigabyte (LLaVA-665k) must not be parsed for each. The
    parsed value is shared: callers must not modify it. Every file read stays cached for the
    process's life (a mixture keeps reading all of its files)."""
    try:
        fp = _fingerprint(path, path.stat())
    except OSError:
        return load_json_file(path)  # raises as it always did (missing, a directory, a loop)
    key = str(path.resolve())
    hit = _PARSED_JSON.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1], hit[2]
    _PARSED_JSON.pop(key, None)  # a changed file: drop the old value before parsing the new
    data, invalid = load_json_file(path)
    _PARSED_JSON[key] = (fp, data, invalid)
    return data, invalid


# JSON lists indexed in this process, by resolved path: (fingerprint, index).
_INDEXED_JSON: dict[str, tuple[tuple[Any, ...], JsonList]] = {}


def json_list_once(path: Path) -> JsonList:
    """The file's `JsonList` (each element's byte span), built once per process while the file
    is unchanged: a data slot opens its file at every epoch, a resume re-reads records, and a
    record count reads it too. Raises as `JsonList` does, `DataError` when it cannot be read
    (a directory, a symlink loop); a missing file raises FileNotFoundError."""
    try:
        fp = _fingerprint(path, path.stat())
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DataError(f"{str(path)[:300]}: cannot read: {e.strerror or e}") from None
    key = str(path.resolve())
    hit = _INDEXED_JSON.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1]
    _INDEXED_JSON.pop(key, None)
    try:
        with open(path, "rb") as f:
            refuse_utf16(f.read(2), path)
        index = JsonList(path)
    except IsADirectoryError as e:
        raise DataError(f"{str(path)[:300]}: cannot read: {e.strerror or e}") from None
    _INDEXED_JSON[key] = (fp, index)
    return index


def clear_json_cache() -> None:
    """Forget every parsed or indexed file (tests; a caller that knows its files are done with)."""
    _PARSED_JSON.clear()
    _INDEXED_JSON.clear()


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(".parquet")


def loads_maybe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
