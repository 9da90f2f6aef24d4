"""Readers for the data formats users bring (REFERENCE §3).

Each reader reads ONE shard or file and yields `Document` records (`Conversation` for SFT) with
images decoded to PIL RGB:

    read_wds_shard        img2dataset WebDataset tar shard (image + .txt caption + .json)
    read_obelics_parquet  OBELICS-style parquet: `images` / `texts` parallel lists
    read_mmc4_jsonl       MMC4 jsonl: `text_list` + `image_info` (images from a local folder)
    read_text             text-only jsonl (or .jsonl.gz) / parquet with a `text` field
    read_llava            LLaVA SFT JSON (a list) or JSONL
    read_llava_yaml       LLaVA-NeXT's YAML list of datasets with sampling strategies

Resuming: readers that take `start` skip the first `start` raw records of the file (bad records
included) without decoding them. Every yielded record carries `meta["__index__"]` (its raw record
index in the file) and `meta["__shard__"]` (the file path), so a loader resumes a shard with
`start = last_meta["__index__"] + 1`.

Bad records (corrupt or missing image, missing caption, malformed JSON line, a tar cut short, an
empty document, an `<image>` count that does not match the images, …) are skipped, counted in a
`ReadStats` by reason and logged with a rate-limited warning; a reader never crashes on them and
never stops silently. Problems of configuration rather than of records fail loudly: an image given
as an http(s) URL (download first), an unknown format, a missing file or column.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mm1.data.document import Conversation, Document

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption")
FORMATS = ("wds", "obelics", "mmc4", "text", "llava", "llava_yaml", "coco")
_SHARD_EXTS: dict[str, tuple[str, ...]] = {
    "wds": (".tar", ".tar.gz", ".tgz"),
    "obelics": (".parquet",),
    "mmc4": (".jsonl", ".jsonl.gz"),
    "text": (".jsonl", ".jsonl.gz", ".parquet"),
    "llava": (".json", ".jsonl"),
    "llava_yaml": (".yaml", ".yml"),
    "coco": (".json",),
}
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataError(RuntimeError):
    """A data source is unusable (too many bad records, a malformed file)."""


# ----------------------------------------------------------------------------------------------
# Statistics and warnings
# ----------------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What readers saw: `records` yielded, `images` decoded, `skipped` records per reason."""

    records: int = 0
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_images: int = 0  # bad images left out of kept documents (`drop_bad_images=True`)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

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
        for reason, n in other.skipped.items():
            self.skip(reason, n)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "images": self.images,
            "skipped": dict(sorted(self.skipped.items())),
            "dropped_images": self.dropped_images,
            "error_rate": self.error_rate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadStats:
        return cls(
            int(d["records"]),
            int(d.get("images", 0)),
            dict(d.get("skipped", {})),
            int(d.get("dropped_images", 0)),
        )


def check_error_rate(
    stats: ReadStats, max_error_rate: float, source: str, min_seen: int = 0
) -> None:
    """Raise `DataError` naming `source` when more than `max_error_rate` of its records were bad.

    Nothing is checked before `min_seen` records were seen (so one bad first record does not count
    as a 100% error rate when called early).
    """
    if stats.seen == 0 or stats.seen < min_seen:
        return
    if stats.error_rate > max_error_rate:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
        raise DataError(
            f"data source {source!r}: {stats.num_skipped} of {stats.seen} records were skipped "
            f"({stats.error_rate:.1%}), more than max_error_rate={max_error_rate:.1%} "
            f"({reasons}). Fix or remove the bad shards, or raise the threshold in the config."
        )


_WARN_FIRST = 5
_warn_counts: Counter[str] = Counter()


def reset_warning_counts() -> None:
    """Forget how many warnings were logged (they are rate-limited per reason and process)."""
    _warn_counts.clear()


def _skip(stats: ReadStats, reason: str, where: str, detail: str = "") -> None:
    """Count a skipped record and log a warning."""
    stats.skip(reason)
    warn_skip(reason, where, detail)


def warn_skip(reason: str, where: str, detail: str = "") -> None:
    """Log a warning: the first 5 per reason (per process), then only at powers of 2."""
    _warn_counts[reason] += 1
    n = _warn_counts[reason]
    if n <= _WARN_FIRST or n & (n - 1) == 0:
        more = (
            f" [{n} '{reason}' so far; further ones are rate-limited]" if n >= _WARN_FIRST else ""
        )
        logger.warning("skipped %s: %s%s%s", where, reason, f" ({detail})" if detail else "", more)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB image (transparent pixels composited on white).

    Raises OSError/ValueError/… for corrupt or truncated data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _to_rgb(im)


def _load_image_file(path: Path) -> Image.Image:
    return decode_image(path.read_bytes())


class _BadImage(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _image_from_path(path: Path) -> Image.Image:
    if not path.is_file():
        raise _BadImage("missing_image", f"no file {path}")
    try:
        return _load_image_file(path)
    except _IMAGE_ERRORS as e:
        raise _BadImage("corrupt_image", f"{path}: {e}") from None


def _image_from_bytes(data: bytes) -> Image.Image:
    try:
        return decode_image(bytes(data))
    except _IMAGE_ERRORS as e:
        raise _BadImage("corrupt_image", str(e)) from None


def _default_image_dir(data_path: Path) -> Path:
    images = data_path.parent / "images"
    return images if images.is_dir() else data_path.parent


# ----------------------------------------------------------------------------------------------
# WebDataset (img2dataset) tar shards
# ----------------------------------------------------------------------------------------------


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: key = path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_end_ok(tf: tarfile.TarFile) -> bool:
    """A complete tar has an end-of-archive marker (zero blocks) where the next header would be;
    Python's tarfile silently stops at a header cut short or missing, so check it ourselves."""
    try:
        tf.fileobj.seek(tf.offset)
        block = tf.fileobj.read(512)
    except (OSError, EOFError):
        return False
    return len(block) == 512 and block.count(0) == 512


def _iter_tar_groups(
    tf: tarfile.TarFile,
) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], bool, str]]:
    """Yield (key, members by extension, complete, problem) per sample; only the last group of a
    broken tar can be incomplete (complete=False, problem says why)."""
    cur_key: str | None = None
    cur: dict[str, tarfile.TarInfo] = {}
    problem = ""
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            problem = str(e) or type(e).__name__
            break
        if m is None:
            break
        if not m.isfile():
            continue
        key, ext = _split_key(m.name)
        if key != cur_key:
            if cur_key is not None:
                yield cur_key, cur, True, ""
            cur_key, cur = key, {}
        cur[ext] = m
    if not problem and not _tar_end_ok(tf):
        problem = "no end-of-archive marker: the file was cut short"
    if cur_key is not None:
        yield cur_key, cur, not problem, problem
    elif problem:
        yield "", {}, False, problem


def read_wds_shard(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    source: str = "captions",
) -> Iterator[Document]:
    """Read an img2dataset WebDataset tar shard: one `Document([image, caption])` per sample.

    Members are grouped by key (the name up to the first dot); the image comes from the
    jpg/jpeg/png/webp member, the caption from `.txt` (else the json's `caption`). `id` is the key,
    `meta` the sample's json plus `__key__`, `__shard__`, `__index__`. The first `start` samples are
    skipped without reading their data. A tar cut short yields every complete sample before the
    cut; the sample at the cut is dropped and counted as `truncated_tar`.
    """
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    try:
        tf = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError, EOFError) as e:
        _skip(stats, "corrupt_tar", str(path), f"unreadable tar: {e}")
        return
    with tf:
        for index, (key, members, complete, problem) in enumerate(_iter_tar_groups(tf)):
            if not complete:
                _skip(stats, "truncated_tar", f"{path}:{key or '<start>'}", problem)
                return
            if index < start:
                continue
            doc = _wds_sample(tf, path, key, members, index, stats, source)
            if doc is not None:
                yield doc


def _wds_sample(
    tf: tarfile.TarFile,
    path: Path,
    key: str,
    members: dict[str, tarfile.TarInfo],
    index: int,
    stats: ReadStats,
    source: str,
) -> Document | None:
    where = f"{path}:{key}"

    def read(m: tarfile.TarInfo) -> bytes:
        f = tf.extractfile(m)
        return f.read() if f is not None else b""

    try:
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                loaded = json.loads(read(members["json"]))
                meta = loaded if isinstance(loaded, dict) else {}
            except (ValueError, UnicodeDecodeError):
                meta = {}
        caption = None
        for ext in CAPTION_EXTS:
            if ext in members:
                caption = read(members[ext]).decode("utf-8", errors="replace")
                break
        if caption is None and isinstance(meta.get("caption"), str):
            caption = meta["caption"]
        image_member = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image_member is None:
            _skip(stats, "missing_image", where)
            return None
        if caption is None or not caption.strip():
            _skip(stats, "missing_caption", where)
            return None
        data = read(image_member)
    except (tarfile.TarError, OSError) as e:
        _skip(stats, "truncated_tar", where, str(e))
        return None
    try:
        image = decode_image(data)
    except _IMAGE_ERRORS as e:
        _skip(stats, "corrupt_image", where, str(e))
        return None
    meta.update({"__key__": key, "__shard__": str(path), "__index__": index})
    stats.records += 1
    stats.images += 1
    return Document(id=key, source=source, parts=[image, caption.strip()], meta=meta)


# ----------------------------------------------------------------------------------------------
# Parquet and JSONL row iteration
# ----------------------------------------------------------------------------------------------


def _parquet_rows(
    path: Path,
    columns: list[str],
    start: int,
    stats: ReadStats,
    required: tuple[str, ...],
    batch_size: int = 256,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row index, {column: value}) from `start` on; whole row groups before `start` are
    skipped without being read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        _skip(stats, "corrupt_file", str(path), str(e))
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
                data = batch.slice(offset).to_pydict()
                for k in range(batch.num_rows - offset):
                    yield first + offset + k, {c: data[c][k] for c in cols}
            group_start += n
    except (pa.ArrowException, OSError) as e:
        _skip(stats, "corrupt_file", str(path), f"stopped reading: {e}")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")  # type: ignore[return-value]
    return open(path, encoding="utf-8", errors="replace")  # type: ignore[return-value]


def _jsonl_records(
    path: Path, start: int, stats: ReadStats
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (record index, object) per non-blank line from `start` on; lines before `start` are
    not parsed. Malformed lines are skipped and counted (`malformed_json`)."""
    index = -1
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                index += 1
                if index < start:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    _skip(stats, "malformed_json", f"{path}:{lineno}", str(e))
                    continue
                if not isinstance(obj, dict):
                    _skip(stats, "malformed_record", f"{path}:{lineno}", "not a JSON object")
                    continue
                yield index, obj
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        _skip(stats, "corrupt_file", str(path), f"stopped reading: {e}")


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(".parquet")


def _loads_maybe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# ----------------------------------------------------------------------------------------------
# Interleaved: OBELICS parquet, MMC4 jsonl
# ----------------------------------------------------------------------------------------------


def _obelics_image(value: Any, root: Path, path: Path, row: int, pos: int) -> Image.Image:
    if isinstance(value, dict):  # HF `datasets` Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _image_from_bytes(value["bytes"])
        value = value.get("path")
        if not value:
            raise _BadImage("missing_image", f"image {pos} has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _image_from_bytes(value)
    if isinstance(value, str):
        if re.match(r"^https?://", value, re.IGNORECASE):
            raise DataError(
                f"{path}: row {row}, image {pos} is a URL ({value}). mm1 does not download "
                "images while training: download them first (e.g. with img2dataset) and store "
                "the image bytes or local file paths in the `images` column."
            )
        p = Path(value)
        return _image_from_path(p if p.is_absolute() else root / p)
    raise _BadImage("malformed_record", f"image {pos} has unsupported type {type(value).__name__}")


def read_obelics_parquet(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    image_root: Path | str | None = None,
    source: str = "interleaved",
    *,
    drop_bad_images: bool = False,
) -> Iterator[Document]:
    """Read an OBELICS-style parquet file: one `Document` per row.

    Columns: `images` (list of image bytes, local paths, or HF `{bytes, path}` structs; null where
    the position is text), `texts` (list of str; null where the position is an image) — exactly
    one of the two is non-null at each position; optional `metadata` (JSON list) and
    `general_metadata` (JSON object), both parsed into `meta`. Relative paths are resolved against
    `image_root` (default: the parquet file's directory). An `http(s)://` image raises
    `DataError`: download the images first. A document with a missing or corrupt image is skipped
    (or, with `drop_bad_images=True`, kept without that image).
    """
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    root = Path(image_root) if image_root is not None else path.parent
    columns = ["images", "texts", "metadata", "general_metadata"]
    for index, row in _parquet_rows(path, columns, start, stats, required=("images", "texts")):
        where = f"{path}: row {index}"
        images, texts = row.get("images"), row.get("texts")
        if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
            _skip(stats, "malformed_record", where, "`images` and `texts` must be parallel lists")
            continue
        parts: list[str | Image.Image] = []
        bad: _BadImage | None = None
        for pos, (img, txt) in enumerate(zip(images, texts)):
            if (img is None) == (txt is None):
                bad = _BadImage(
                    "malformed_record", f"position {pos}: need exactly one of image/text"
                )
                break
            if txt is not None:
                if txt.strip():
                    parts.append(txt)
                continue
            try:
                parts.append(_obelics_image(img, root, path, index, pos))
            except _BadImage as e:
                if drop_bad_images and e.reason != "malformed_record":
                    stats.dropped_images += 1
                    warn_skip(e.reason, f"{where}, image {pos} (dropped)", e.detail)
                    continue
                bad = e
                break
        if bad is not None:
            _skip(stats, bad.reason, where, bad.detail)
            continue
        if not parts:
            _skip(stats, "empty_document", where)
            continue
        general = _loads_maybe(row.get("general_metadata"))
        meta = {
            "general_metadata": general,
            "metadata": _loads_maybe(row.get("metadata")),
            "__shard__": str(path),
            "__index__": index,
        }
        stats.records += 1
        stats.images += sum(isinstance(p, Image.Image) for p in parts)
        yield Document(id=f"{path.name}:{index}", source=source, parts=parts, meta=meta)


def read_mmc4_jsonl(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    image_dir: Path | str | None = None,
    source: str = "interleaved",
    *,
    image_position: str = "before",
    drop_bad_images: bool = False,
) -> Iterator[Document]:
    """Read an MMC4 jsonl file: one `Document` per line.

    `text_list` holds the sentences; each `image_info` entry {image_name, raw_url,
    matched_text_index, matched_sim} is loaded from `image_dir/image_name` and placed next to its
    matched sentence: `image_position="before"` (default) puts the image before the sentence,
    which is what OpenFlamingo, the model MMC4 was built for, does (it prepends `<image>` to the
    matched sentence, so the text that follows an image is the text about it); "after" puts it
    after. Several images matched to one sentence keep their `image_info` order. Sentences are
    joined with single spaces. `image_dir` defaults to the jsonl's `images/` subfolder if it
    exists, else its directory. Images are never downloaded (`raw_url` is ignored).
    """
    if image_position not in ("before", "after"):
        raise ValueError(f"image_position must be 'before' or 'after', got {image_position!r}")
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    folder = Path(image_dir) if image_dir is not None else _default_image_dir(path)
    for index, rec in _jsonl_records(path, start, stats):
        where = f"{path}: line record {index}"
        text_list = rec.get("text_list")
        infos = rec.get("image_info") or []
        if (
            not isinstance(text_list, list)
            or not all(isinstance(t, str) for t in text_list)
            or not isinstance(infos, list)
        ):
            _skip(stats, "malformed_record", where, "needs `text_list` (list of str), `image_info`")
            continue
        by_sentence: dict[int, list[Image.Image]] = {}
        bad: _BadImage | None = None
        for info in infos:
            j = info.get("matched_text_index") if isinstance(info, dict) else None
            name = info.get("image_name") if isinstance(info, dict) else None
            if not isinstance(j, int) or not 0 <= j < len(text_list) or not isinstance(name, str):
                bad = _BadImage("malformed_record", f"bad image_info entry {info!r:.200}")
                break
            try:
                img = _image_from_path(folder / name)
            except _BadImage as e:
                if drop_bad_images:
                    stats.dropped_images += 1
                    warn_skip(e.reason, f"{where}, {name} (dropped)", e.detail)
                    continue
                bad = e
                break
            by_sentence.setdefault(j, []).append(img)
        if bad is not None:
            _skip(stats, bad.reason, where, bad.detail)
            continue
        parts: list[str | Image.Image] = []
        for j, sentence in enumerate(text_list):
            imgs = by_sentence.get(j, [])
            if image_position == "before":
                parts.extend(imgs)
            if sentence.strip():
                if parts and isinstance(parts[-1], str):
                    parts[-1] = parts[-1] + " " + sentence
                else:
                    parts.append(sentence)
            if image_position == "after":
                parts.extend(imgs)
        if not parts:
            _skip(stats, "empty_document", where)
            continue
        meta = {k: v for k, v in rec.items() if k not in ("text_list",)}
        meta.update({"__shard__": str(path), "__index__": index})
        stats.records += 1
        stats.images += sum(isinstance(p, Image.Image) for p in parts)
        yield Document(id=f"{path.name}:{index}", source=source, parts=parts, meta=meta)


# ----------------------------------------------------------------------------------------------
# Text-only
# ----------------------------------------------------------------------------------------------


def read_text(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    field: str = "text",
    source: str = "text",
) -> Iterator[Document]:
    """Read text-only documents from jsonl (.jsonl, .jsonl.gz) or parquet (by extension).

    One `Document([text])` per record; records whose `field` is missing or blank are skipped as
    `empty_document`. `id` is the record's `id` when present."""
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    if _is_parquet(path):
        rows = _parquet_rows(path, [field, "id"], start, stats, required=(field,))
    else:
        rows = _jsonl_records(path, start, stats)
    for index, rec in rows:
        text = rec.get(field)
        if not isinstance(text, str) or not text.strip():
            _skip(stats, "empty_document", f"{path}: record {index}", f"no text in `{field}`")
            continue
        meta = {k: v for k, v in rec.items() if k != field}
        meta.update({"__shard__": str(path), "__index__": index})
        doc_id = rec.get("id")
        stats.records += 1
        yield Document(
            id=str(doc_id) if doc_id is not None else f"{path.name}:{index}",
            source=source,
            parts=[text],
            meta=meta,
        )


def _coco_entries(path: Path) -> list[tuple[dict[str, Any], list[str]]]:
    """(image record, its captions) in the file's image order."""
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected COCO captions JSON") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: COCO captions JSON needs 'images' and 'annotations'")
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann.get("image_id"), []).append(ann.get("caption", ""))
    return [(im, captions.get(im.get("id"), [])) for im in data["images"]]


def read_coco_captions(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    image_root: Path | str | None = None,
    source: str = "captions",
) -> Iterator[Document]:
    """Caption pairs from a COCO-captions JSON (COCO, NoCaps, TextCaps layout): one
    `Document([image, caption])` per image with its first caption; the image is `file_name`
    under `image_root` (default: an `images/` folder next to the file, else its folder). Records
    are the images in file order; an image without a caption is skipped as `missing_caption`."""
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    root = Path(image_root) if image_root is not None else _default_image_dir(path)
    for index, (im, caps) in enumerate(_coco_entries(path)):
        if index < start:
            continue
        where = f"{path}: image {im.get('id')}"
        caption = next((c.strip() for c in caps if isinstance(c, str) and c.strip()), None)
        if caption is None:
            _skip(stats, "missing_caption", where)
            continue
        try:
            image = _image_from_path(root / str(im.get("file_name", "")))
        except _BadImage as e:
            _skip(stats, e.reason, where, e.detail)
            continue
        stats.records += 1
        stats.images += 1
        meta = {k: v for k, v in im.items()}
        meta.update({"captions": caps, "__shard__": str(path), "__index__": index})
        yield Document(
            id=str(im.get("id", index)), source=source, parts=[image, caption], meta=meta
        )


# ----------------------------------------------------------------------------------------------
# SFT: LLaVA JSON / JSONL and LLaVA-NeXT YAML
# ----------------------------------------------------------------------------------------------


def _llava_records(path: Path, stats: ReadStats) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_records(path, 0, stats)
        return
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); LLaVA data is a JSON list") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: LLaVA data must be a JSON list, got {type(data).__name__}")
    for index, rec in enumerate(data):
        if not isinstance(rec, dict):
            _skip(stats, "malformed_record", f"{path}: record {index}", "not a JSON object")
            continue
        yield index, rec


def _llava_conversation(
    rec: dict[str, Any],
    index: int,
    path: Path,
    image_folder: Path,
    stats: ReadStats,
    source: str,
) -> Conversation | None:
    where = f"{path}: record {index}"
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        _skip(stats, "empty_document", where, "no conversations")
        return None
    messages: list[dict[str, str]] = []
    for turn in turns:
        role = value = None
        if isinstance(turn, dict):
            role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            _skip(stats, "malformed_record", where, f"bad turn {turn!r:.200}")
            return None
        messages.append({"role": role, "content": value})
    image_field = rec.get("image", rec.get("images"))
    if image_field is None:
        files: list[str] = []
    elif isinstance(image_field, str):
        files = [image_field]
    elif isinstance(image_field, list) and all(isinstance(x, str) for x in image_field):
        files = list(image_field)
    else:
        _skip(stats, "malformed_record", where, "`image` must be a path or a list of paths")
        return None
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if len(files) == 1 and n_tags == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            _skip(stats, "image_count_mismatch", where, "one image but no user turn")
            return None
        first_user["content"] = f"{IMAGE_TAG}\n{first_user['content']}"
    elif n_tags != len(files):
        _skip(
            stats,
            "image_count_mismatch",
            where,
            f"{n_tags} {IMAGE_TAG} tag(s) for {len(files)} image(s)",
        )
        return None
    images = []
    for name in files:
        p = Path(name)
        try:
            images.append(_image_from_path(p if p.is_absolute() else image_folder / p))
        except _BadImage as e:
            _skip(stats, e.reason, where, e.detail)
            return None
    meta = {k: v for k, v in rec.items() if k != "conversations"}
    meta.update({"__shard__": str(path), "__index__": index})
    stats.records += 1
    stats.images += len(images)
    conv_id = rec.get("id")
    return Conversation(
        id=str(conv_id) if conv_id is not None else f"{path.name}:{index}",
        images=images,
        messages=messages,
        source=source,
        meta=meta,
    )


def read_llava(
    path: str | Path,
    image_folder: str | Path | None = None,
    stats: ReadStats | None = None,
    *,
    start: int = 0,
    source: str = "sft",
) -> Iterator[Conversation]:
    """Read LLaVA SFT data: a JSON list (.json) or one record per line (.jsonl).

    Record: {id, image (a path relative to `image_folder`, a list of paths for multi-image, or
    absent for text-only), conversations: [{from: human|gpt|system, value}]}. Roles map to
    user/assistant/system. Each `<image>` tag marks where the next image goes, and the number of
    tags must equal the number of images — except one image with no tag, where `<image>\\n` is
    prepended to the first user turn as LLaVA does; any other mismatch is a bad record
    (`image_count_mismatch`). `image_folder` defaults to the file's `images/` subfolder if it
    exists, else its directory. A whole .json file that is not valid JSON raises `DataError`.
    """
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    folder = Path(image_folder) if image_folder is not None else _default_image_dir(path)
    for index, rec in _llava_records(path, stats):
        if index < start:
            continue
        conv = _llava_conversation(rec, index, path, folder, stats, source)
        if conv is not None:
            yield conv


def _sample_indices(n: int, strategy: str, rng: random.Random, where: str) -> list[int]:
    """LLaVA-NeXT's sampling strategies over `n` records.

    `all`; `first:N` (the first N); `end:N` (the last N); `random:N` (N drawn at random, here with
    a seeded RNG and kept in file order). N may be a percentage (`10%`), rounded up as LLaVA-NeXT
    does (ceil(p·n/100)); N larger than n means all. Deviation: `end:0` selects nothing (LLaVA-NeXT's
    `list[-0:]` would select everything).
    """
    s = str(strategy).strip()
    if s == "all":
        return list(range(n))
    name, sep, number = s.partition(":")
    if not sep or name not in ("first", "end", "random") or not number.strip():
        raise ValueError(
            f"{where}: unknown sampling_strategy {s!r}; expected all, first:N, end:N or random:N "
            "(N a count or a percentage such as 10%)"
        )
    number = number.strip()
    try:
        k = math.ceil(float(number[:-1]) * n / 100) if number.endswith("%") else int(number)
    except ValueError:
        raise ValueError(f"{where}: bad number in sampling_strategy {s!r}") from None
    if k < 0:
        raise ValueError(f"{where}: negative number in sampling_strategy {s!r}")
    k = min(k, n)
    if name == "first":
        return list(range(k))
    if name == "end":
        return list(range(n - k, n))
    return sorted(rng.sample(range(n), k))


def llava_yaml_datasets(
    yaml_path: str | Path, image_folder: str | Path | None = None
) -> list[dict[str, Any]]:
    """The datasets a LLaVA-NeXT YAML lists: [{json_path, sampling_strategy, image_folder}].

    Relative `json_path`/`image_folder` are resolved against the YAML's directory. A dataset's
    `image_folder` key (an mm1 extension; LLaVA-NeXT takes one `--image_folder` for all) overrides
    the `image_folder` argument, which defaults to the json's `images/` subfolder or directory.
    """
    import yaml

    yaml_path = Path(yaml_path)
    data = yaml.safe_load(yaml_path.read_text())
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise DataError(f"{yaml_path}: expected a `datasets:` list of {{json_path, ...}} entries")
    out = []
    for i, ds in enumerate(datasets):
        if not isinstance(ds, dict) or not isinstance(ds.get("json_path"), str):
            raise DataError(f"{yaml_path}: dataset {i} has no `json_path`")
        json_path = Path(ds["json_path"])
        if not json_path.is_absolute():
            json_path = yaml_path.parent / json_path
        folder = ds.get("image_folder", image_folder)
        if folder is None:
            folder_path = _default_image_dir(json_path)
        else:
            folder_path = Path(folder)
            if not folder_path.is_absolute():
                folder_path = yaml_path.parent / folder_path
        out.append(
            {
                "json_path": json_path,
                "json_path_as_written": ds["json_path"],
                "sampling_strategy": str(ds.get("sampling_strategy", "all")),
                "image_folder": folder_path,
            }
        )
    return out


def read_llava_yaml(
    yaml_path: str | Path,
    seed: int = 0,
    stats: ReadStats | None = None,
    *,
    start: int = 0,
    image_folder: str | Path | None = None,
    source: str = "sft",
) -> Iterator[Conversation]:
    """Read every dataset of a LLaVA-NeXT data YAML, applying its `sampling_strategy`.

        datasets:
          - json_path: llava_v1_5_mix665k.json
            sampling_strategy: first:10%     # all | first:N | end:N | random:N  (N or N%)
            image_folder: images             # optional (mm1 extension)

    `random:` is deterministic for a given `seed` (LLaVA-NeXT shuffles with the global RNG); the
    chosen records keep their file order. Records are selected among the file's parseable records
    (as LLaVA-NeXT counts loaded records), then converted (bad ones skipped and counted).
    Each conversation's meta gets `dataset` (the json path as written in the YAML) and
    `__record__` (its index in that file); `__index__` is its position in the sequence of all
    selected records of the YAML, which is what `start` skips (without loading images) and what
    `count_records(yaml, "llava_yaml")` counts.
    """
    stats = ReadStats() if stats is None else stats
    position = 0
    for i, ds in enumerate(llava_yaml_datasets(yaml_path, image_folder)):
        records = list(_llava_records(ds["json_path"], ReadStats() if position < start else stats))
        rng = random.Random(f"{seed}/{i}/{ds['json_path_as_written']}")
        where = f"{yaml_path}: dataset {ds['json_path_as_written']}"
        for k in _sample_indices(len(records), ds["sampling_strategy"], rng, where):
            position += 1
            if position <= start:
                continue
            index, rec = records[k]
            conv = _llava_conversation(
                rec, index, ds["json_path"], ds["image_folder"], stats, source
            )
            if conv is not None:
                conv.meta.update(
                    {
                        "dataset": ds["json_path_as_written"],
                        "__record__": index,
                        "__index__": position - 1,
                        "__shard__": str(yaml_path),
                    }
                )
                yield conv


# ----------------------------------------------------------------------------------------------
# The readers by format name (shard listing, counts and inspection live in mm1.data.catalog)
# ----------------------------------------------------------------------------------------------

READERS: dict[str, Callable[..., Iterator[Any]]] = {
    "wds": read_wds_shard,
    "obelics": read_obelics_parquet,
    "mmc4": read_mmc4_jsonl,
    "text": read_text,
    "llava": read_llava,
    "llava_yaml": read_llava_yaml,
    "coco": read_coco_captions,
}
