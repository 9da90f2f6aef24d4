"""WebDataset (img2dataset) tar shards: image + .txt caption + .json per sample."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm1.data.document import Document
from mm1.data.sources.base import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    BadImage,
    ReadStats,
    count_images,
    image_from_bytes,
    over_text_cap,
    repair_record,
    skip_record,
    too_deep,
)
from mm1.data.sources.unicode import decode_utf8


def split_key(name: str) -> tuple[str, str]:
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
        key, ext = split_key(m.name)
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
    kind: str = "captions",
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
        if isinstance(e, FileNotFoundError):
            raise
        size = path.stat().st_size if path.is_file() else -1
        # tarfile lists every compression it tried, one per line: say what matters instead.
        why = "0-byte file" if size == 0 else f"not a tar archive ({size} bytes)"
        skip_record(stats, "corrupt_tar", str(path), f"unreadable tar: {why}")
        return
    with tf:
        for index, (key, members, complete, problem) in enumerate(_iter_tar_groups(tf)):
            if not complete:
                skip_record(stats, "truncated_tar", f"{path}:{key or '<start>'}", problem)
                return
            if index < start:
                continue
            doc = _wds_sample(tf, path, key, members, index, stats, kind)
            if doc is not None:
                yield doc


def _wds_sample(
    tf: tarfile.TarFile,
    path: Path,
    key: str,
    members: dict[str, tarfile.TarInfo],
    index: int,
    stats: ReadStats,
    kind: str,
) -> Document | None:
    where = f"{path}:{key}"

    def read(m: tarfile.TarInfo) -> bytes:
        f = tf.extractfile(m)
        return f.read() if f is not None else b""

    # A caption member too large for the text cap is not read (a 256 MB caption would be read
    # whole, then skipped); its tar header gives its size. Only the caption the sample uses
    # counts: the json holds metadata too, which the cap does not count.
    caption_member = next((members[e] for e in CAPTION_EXTS if e in members), None)
    if caption_member is not None and over_text_cap(caption_member.size):
        detail = f"{caption_member.name}: {caption_member.size:,} bytes of caption"
        skip_record(stats, "too_long_text", where, detail)
        return None
    try:
        meta: dict[str, Any] = {}
        invalid = False  # some text member held bytes that are not UTF-8
        if "json" in members:
            text, invalid = decode_utf8(read(members["json"]))
            try:
                loaded = json.loads(text)
                meta = loaded if isinstance(loaded, dict) and not too_deep(loaded) else {}
            except (ValueError, RecursionError):
                meta = {}
        caption = None
        for ext in CAPTION_EXTS:
            if ext in members:
                caption, bad = decode_utf8(read(members[ext]))
                invalid = invalid or bad
                break
        fixed = repair_record(stats, {"meta": meta, "caption": caption}, where, invalid)
        meta, caption = fixed["meta"], fixed["caption"]
        if caption is None and isinstance(meta.get("caption"), str):
            caption = meta["caption"]
        image_member = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image_member is None:
            skip_record(stats, "missing_image", where)
            return None
        if caption is None or not caption.strip():
            skip_record(stats, "missing_caption", where)
            return None
        data = read(image_member)
    except (tarfile.TarError, OSError) as e:
        skip_record(stats, "truncated_tar", where, str(e))
        return None
    try:
        image = image_from_bytes(data, f"{path}:{image_member.name}")
    except BadImage as e:  # corrupt, or refused for its size from the header
        skip_record(stats, e.reason, where, e.detail)
        return None
    meta.update({"__key__": key, "__shard__": str(path), "__index__": index})
    stats.records += 1
    count_images(stats, [image])
    return Document(id=key, kind=kind, parts=[image, caption.strip()], meta=meta)
