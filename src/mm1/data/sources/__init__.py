"""Readers for the data formats users bring (REFERENCE §3).

Each reader reads ONE shard or file and yields `Document` records (`Conversation` for SFT) with
images decoded to PIL RGB:

    read_wds_shard        img2dataset WebDataset tar shard (image + .txt caption + .json)
    read_obelics_parquet  OBELICS-style parquet: `images` / `texts` parallel lists
    read_mmc4_jsonl       MMC4 jsonl: `text_list` + `image_info` (images from a local folder)
    read_text             text-only jsonl (or .jsonl.gz) / parquet with a `text` field
    read_llava            LLaVA SFT JSON (a list) or JSONL
    read_llava_yaml       LLaVA-NeXT's YAML list of datasets with sampling strategies
    read_coco_captions    COCO-captions JSON (COCO, NoCaps, TextCaps layout)

One module per family (`wds`, `interleaved`, `text`, `llava`), the shared machinery in `base`;
this package exposes them and the `READERS` registry.

Resuming: readers that take `start` skip the first `start` raw records of the file (bad records
included) without decoding them. Every yielded record carries `meta["__index__"]` (its raw record
index in the file) and `meta["__shard__"]` (the file path), so a loader resumes a shard with
`start = last_meta["__index__"] + 1`.

Bad records (corrupt or missing image, missing caption, malformed JSON line, a tar cut short, an
empty document, an `<image>` count that does not match the images, …) are skipped, counted in a
`ReadStats` by reason and logged with a rate-limited warning; a reader never crashes on them and
never stops silently. Text that is not valid Unicode (bytes that are not UTF-8, a lone UTF-16
surrogate such as JSON's `"\ud800"`) is repaired to U+FFFD and the record kept, counted in
`ReadStats.repaired` (`invalid_utf8`, `lone_surrogate`) and logged. Problems of configuration rather than of records fail loudly: an image given
as an http(s) URL (download first), an unknown format, a missing file or column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from mm1.data.sources.base import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    IMAGE_TAG,
    DataError,
    ReadStats,
    check_error_rate,
    decode_image,
    reset_warning_counts,
    warn_skip,
)
from mm1.data.sources.interleaved import read_mmc4_jsonl, read_obelics_parquet
from mm1.data.sources.llava import llava_yaml_datasets, read_llava, read_llava_yaml
from mm1.data.sources.text import read_coco_captions, read_text
from mm1.data.sources.wds import read_wds_shard

FORMATS = ("wds", "obelics", "mmc4", "text", "llava", "llava_yaml", "coco")
SHARD_EXTS: dict[str, tuple[str, ...]] = {
    "wds": (".tar", ".tar.gz", ".tgz"),
    "obelics": (".parquet",),
    "mmc4": (".jsonl", ".jsonl.gz"),
    "text": (".jsonl", ".jsonl.gz", ".parquet"),
    "llava": (".json", ".jsonl"),
    "llava_yaml": (".yaml", ".yml"),
    "coco": (".json",),
}

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


__all__ = [
    "CAPTION_EXTS",
    "FORMATS",
    "IMAGE_EXTS",
    "IMAGE_TAG",
    "READERS",
    "SHARD_EXTS",
    "DataError",
    "ReadStats",
    "check_error_rate",
    "decode_image",
    "llava_yaml_datasets",
    "read_coco_captions",
    "read_llava",
    "read_llava_yaml",
    "read_mmc4_jsonl",
    "read_obelics_parquet",
    "read_text",
    "read_wds_shard",
    "reset_warning_counts",
    "warn_skip",
]
