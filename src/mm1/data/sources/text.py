"""Text-only documents (jsonl / parquet) and COCO-style caption files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm1.data.document import Document
from mm1.data.sources.base import (
    BadImage,
    DataError,
    ReadStats,
    count_images,
    default_image_dir,
    image_from_path,
    is_parquet,
    load_json_file,
    parquet_rows,
    repair_record,
    resolve_image_path,
    skip_record,
    too_deep,
)
from mm1.data.sources.jsonl import jsonl_records


def read_text(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    field: str = "text",
    kind: str = "text",
) -> Iterator[Document]:
    """Read text-only documents from jsonl (.jsonl, .jsonl.gz) or parquet (by extension).

    One `Document([text])` per record; records whose `field` is missing or blank are skipped as
    `empty_document`. `id` is the record's `id` when present."""
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    if is_parquet(path):
        rows = parquet_rows(
            path, [field, "id"], start, stats, required=(field,), text_columns=(field,)
        )
    else:
        rows = jsonl_records(path, start, stats)
    for index, rec in rows:
        text = rec.get(field)
        if not isinstance(text, str) or not text.strip():
            skip_record(stats, "empty_document", f"{path}: record {index}", f"no text in `{field}`")
            continue
        meta = {k: v for k, v in rec.items() if k != field}
        meta.update({"__shard__": str(path), "__index__": index})
        doc_id = rec.get("id")
        stats.records += 1
        yield Document(
            id=str(doc_id) if doc_id is not None else f"{path.name}:{index}",
            kind=kind,
            parts=[text],
            meta=meta,
        )


def _coco_id(value: Any) -> bool:
    """COCO ids are ints (some derived sets use strings); anything else cannot key captions."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def coco_entries(
    path: Path, stats: ReadStats | None = None
) -> list[tuple[dict[str, Any] | None, list[str]]]:
    """(image record, its captions) in the file's image order.

    An image entry that is not an object with an int or string `id` comes as `(None, [])`, so
    positions stay the file's record indices. Annotations that are not objects with an int or
    string `image_id` and a string `caption` are left out and, when `stats` is given, counted as
    `malformed_annotation`. A file that is not a JSON object with `images` and `annotations`
    lists raises `DataError`."""
    try:
        data, invalid_bytes = load_json_file(path)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected COCO captions JSON") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: COCO captions JSON needs 'images' and 'annotations'")
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(
            f"{path}: COCO captions JSON needs 'images' and 'annotations' lists, got "
            f"{type(images).__name__} and {type(annotations).__name__}"
        )
    captions: dict[int | str, list[str]] = {}
    # Bad text is repaired (and counted, per annotation and per image entry, when `stats` is
    # given), so ids, file names and captions are valid Unicode.
    count = stats if stats is not None else ReadStats()
    for i, ann in enumerate(annotations):
        ann = None if too_deep(ann) else ann  # counted as malformed below
        ann = repair_record(count, ann, f"{path}: annotation {i}", invalid_bytes)
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if not _coco_id(image_id) or not isinstance(caption, str):
            if stats is not None:
                skip_record(
                    stats, "malformed_annotation", f"{path}: annotation {i}", f"{ann!r:.200}"
                )
            continue
        captions.setdefault(image_id, []).append(caption)
    entries: list[tuple[dict[str, Any] | None, list[str]]] = []
    for i, im in enumerate(images):
        im = None if too_deep(im) else im  # a malformed entry: skipped by the reader
        im = repair_record(count, im, f"{path}: image entry {i}", invalid_bytes)
        ok = isinstance(im, dict) and _coco_id(im.get("id"))
        entries.append((im, captions.get(im["id"], [])) if ok else (None, []))
    return entries


def read_coco_captions(
    path: str | Path,
    start: int = 0,
    stats: ReadStats | None = None,
    image_root: Path | str | None = None,
    kind: str = "captions",
    allow_absolute_paths: bool = False,
) -> Iterator[Document]:
    """Caption pairs from a COCO-captions JSON (COCO, NoCaps, TextCaps layout): one
    `Document([image, caption])` per image with its first caption; the image is `file_name`
    under `image_root` (default: an `images/` folder next to the file, else its folder). Records
    are the images in file order; an image without a caption is skipped as `missing_caption`, a
    `file_name` that is absolute or climbs out of the root as `absolute_path` /
    `path_outside_root` (unless `allow_absolute_paths`)."""
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    root = Path(image_root) if image_root is not None else default_image_dir(path)
    # Annotations are not records: count the malformed ones only on a pass from the file's
    # start, so a resumed (or re-read) file does not count them again.
    entries = coco_entries(path, stats if start == 0 else None)
    for index, (im, caps) in enumerate(entries):
        if index < start:
            continue
        if im is None or not isinstance(im.get("file_name"), str):
            skip_record(
                stats,
                "malformed_record",
                f"{path}: image entry {index}",
                "needs an object with an int or string `id` and a string `file_name`",
            )
            continue
        where = f"{path}: image {im['id']}"
        caption = next((c.strip() for c in caps if c.strip()), None)
        if caption is None:
            skip_record(stats, "missing_caption", where)
            continue
        try:
            image = image_from_path(resolve_image_path(root, im["file_name"], allow_absolute_paths))
        except BadImage as e:
            skip_record(stats, e.reason, where, e.detail)
            continue
        stats.records += 1
        count_images(stats, [image])
        meta = {k: v for k, v in im.items()}
        meta.update({"captions": caps, "__shard__": str(path), "__index__": index})
        yield Document(id=str(im["id"]), kind=kind, parts=[image, caption], meta=meta)
