"""Interleaved image-text documents: OBELICS-style parquet and MMC4 jsonl."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from mm1.data.document import Document
from mm1.data.sources.base import (
    BadImage,
    DataError,
    ReadStats,
    count_images,
    default_image_dir,
    image_from_bytes,
    image_from_path,
    loads_maybe,
    parquet_rows,
    resolve_image_path,
    skip_record,
    warn_skip,
)
from mm1.data.sources.jsonl import jsonl_records


def _obelics_image(
    value: Any, root: Path, path: Path, row: int, pos: int, allow_outside: bool
) -> Image.Image:
    if isinstance(value, dict):  # HF `datasets` Image feature: {"bytes": ..., "path": ...}
        data = value.get("bytes")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            # a wrong schema: bytes(10**10) would allocate 10 GB, bytes("x") raise TypeError
            raise BadImage("malformed_record", f"image {pos}: `bytes` is a {type(data).__name__}")
        if data:
            return image_from_bytes(data, f"{path}: row {row}, image {pos}")
        value = value.get("path")
        if not value:
            raise BadImage("missing_image", f"image {pos} has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return image_from_bytes(value, f"{path}: row {row}, image {pos}")
    if isinstance(value, str):
        if re.match(r"^https?://", value, re.IGNORECASE):
            raise DataError(
                f"{path}: row {row}, image {pos} is a URL ({value}). mm1 does not download "
                "images while training: download them first (e.g. with img2dataset) and store "
                "the image bytes or local file paths in the `images` column."
            )
        return image_from_path(resolve_image_path(root, value, allow_outside))
    raise BadImage("malformed_record", f"image {pos} has unsupported type {type(value).__name__}")


def read_obelics_parquet(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    image_root: Path | str | None = None,
    kind: str = "interleaved",
    *,
    drop_bad_images: bool = False,
    allow_absolute_paths: bool = False,
) -> Iterator[Document]:
    """Read an OBELICS-style parquet file: one `Document` per row.

    Columns: `images` (list of image bytes, local paths, or HF `{bytes, path}` structs; null where
    the position is text), `texts` (list of str; null where the position is an image) — exactly
    one of the two is non-null at each position; optional `metadata` (JSON list) and
    `general_metadata` (JSON object), both parsed into `meta`. Relative paths are resolved against
    `image_root` (default: the parquet file's directory); a path that is absolute or climbs out
    of it with `..` is a bad image (`absolute_path`, `path_outside_root`) unless
    `allow_absolute_paths`. An `http(s)://` image raises
    `DataError`: download the images first. A document with a missing or corrupt image is skipped
    (or, with `drop_bad_images=True`, kept without that image).
    """
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    root = Path(image_root) if image_root is not None else path.parent
    columns = ["images", "texts", "metadata", "general_metadata"]
    rows = parquet_rows(
        path, columns, start, stats, required=("images", "texts"), text_columns=("texts",)
    )
    for index, row in rows:
        where = f"{path}: row {index}"
        images, texts = row.get("images"), row.get("texts")
        if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
            skip_record(
                stats, "malformed_record", where, "`images` and `texts` must be parallel lists"
            )
            continue
        parts: list[str | Image.Image] = []
        bad: BadImage | None = None
        for pos, (img, txt) in enumerate(zip(images, texts)):
            if (img is None) == (txt is None):
                bad = BadImage(
                    "malformed_record", f"position {pos}: need exactly one of image/text"
                )
                break
            if txt is not None:
                if not isinstance(txt, str):  # a malformed file can hold numbers or structs
                    bad = BadImage(
                        "malformed_record", f"position {pos}: text is a {type(txt).__name__}"
                    )
                    break
                if txt.strip():
                    parts.append(txt)
                continue
            try:
                parts.append(_obelics_image(img, root, path, index, pos, allow_absolute_paths))
            except BadImage as e:
                if drop_bad_images and e.reason != "malformed_record":
                    stats.dropped_images += 1
                    warn_skip(e.reason, f"{where}, image {pos} (dropped)", e.detail)
                    continue
                bad = e
                break
        if bad is not None:
            skip_record(stats, bad.reason, where, bad.detail)
            continue
        if not parts:
            skip_record(stats, "empty_document", where)
            continue
        general = loads_maybe(row.get("general_metadata"))
        meta = {
            "general_metadata": general,
            "metadata": loads_maybe(row.get("metadata")),
            "__shard__": str(path),
            "__index__": index,
        }
        stats.records += 1
        count_images(stats, parts)
        yield Document(id=f"{path.name}:{index}", kind=kind, parts=parts, meta=meta)


def read_mmc4_jsonl(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    image_dir: Path | str | None = None,
    kind: str = "interleaved",
    *,
    image_position: str = "before",
    drop_bad_images: bool = False,
    allow_absolute_paths: bool = False,
) -> Iterator[Document]:
    """Read an MMC4 jsonl file: one `Document` per line.

    `text_list` holds the sentences; each `image_info` entry {image_name, raw_url,
    matched_text_index, matched_sim} is loaded from `image_dir/image_name` and placed next to its
    matched sentence: `image_position="before"` (default) puts the image before the sentence,
    which is what OpenFlamingo, the model MMC4 was built for, does (it prepends `<image>` to the
    matched sentence, so the text that follows an image is the text about it); "after" puts it
    after. Several images matched to one sentence keep their `image_info` order. Sentences are
    joined with single spaces. `image_dir` defaults to the jsonl's `images/` subfolder if it
    exists, else its directory; an `image_name` that is absolute or climbs out of it is a bad
    image (`absolute_path`, `path_outside_root`) unless `allow_absolute_paths`. Images are never
    downloaded (`raw_url` is ignored).
    """
    if image_position not in ("before", "after"):
        raise ValueError(f"image_position must be 'before' or 'after', got {image_position!r}")
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    folder = Path(image_dir) if image_dir is not None else default_image_dir(path)
    for index, rec in jsonl_records(path, start, stats):
        where = f"{path}: record {index}"
        text_list = rec.get("text_list")
        infos = rec.get("image_info") or []
        if (
            not isinstance(text_list, list)
            or not all(isinstance(t, str) for t in text_list)
            or not isinstance(infos, list)
        ):
            skip_record(
                stats, "malformed_record", where, "needs `text_list` (list of str), `image_info`"
            )
            continue
        by_sentence: dict[int, list[Image.Image]] = {}
        bad: BadImage | None = None
        for info in infos:
            j = info.get("matched_text_index") if isinstance(info, dict) else None
            name = info.get("image_name") if isinstance(info, dict) else None
            if not isinstance(j, int) or not 0 <= j < len(text_list) or not isinstance(name, str):
                bad = BadImage("malformed_record", f"bad image_info entry {info!r:.200}")
                break
            try:
                img = image_from_path(resolve_image_path(folder, name, allow_absolute_paths))
            except BadImage as e:
                if drop_bad_images:
                    stats.dropped_images += 1
                    warn_skip(e.reason, f"{where}, {name} (dropped)", e.detail)
                    continue
                bad = e
                break
            by_sentence.setdefault(j, []).append(img)
        if bad is not None:
            skip_record(stats, bad.reason, where, bad.detail)
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
            skip_record(stats, "empty_document", where)
            continue
        meta = {k: v for k, v in rec.items() if k not in ("text_list",)}
        meta.update({"__shard__": str(path), "__index__": index})
        stats.records += 1
        count_images(stats, parts)
        yield Document(id=f"{path.name}:{index}", kind=kind, parts=parts, meta=meta)
