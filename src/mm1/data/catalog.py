"""What a source holds: its shard files, record counts, format, and a readable summary.

Readers themselves are in `mm1.data.sources`; this module finds and describes what they read.
"""

from __future__ import annotations

import glob as globlib
import json
import random
import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from braceexpand import UnbalancedBracesError, braceexpand
from PIL import Image

from mm1.config import SourceConfig
from mm1.data.document import Conversation, Document
from mm1.data.sources import (
    FORMATS,
    IMAGE_TAG,
    READERS,
    SHARD_EXTS,
    DataError,
    ReadStats,
    llava_yaml_datasets,
)
from mm1.data.sources.base import UnknownFormatError, is_parquet, open_text
from mm1.data.sources.llava import count_llava_records, sample_indices
from mm1.data.sources.text import coco_entries
from mm1.data.sources.wds import split_key
from mm1.fs import read_json


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def expand_braces(pattern: str) -> list[str]:
    """A shard list as WebDataset names it, expanded as WebDataset expands it (braceexpand):
    ranges keep zero padding (`{000..009}`, padded to the wider end as bash does), lists
    (`{a,b}`) and several braces per path expand, backslashes are kept; a path whose braces do
    not balance is taken as written."""
    try:
        return list(braceexpand(pattern, escape=False))
    except UnbalancedBracesError:
        return [pattern]


def refuse_urls(path: str) -> None:
    """Sources are local files. `pipe:` URLs (WebDataset runs them as shell commands) and
    remote URLs are refused with a one-line error."""
    if path.startswith("pipe:"):
        raise DataError(
            f"{path}: pipe: URLs run shell commands and are not supported; "
            "write the shards to local files and name those"
        )
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
        raise DataError(
            f"{path}: remote URLs are not read; download the shards and name the local files"
        )


def _has_ext(path: Path, exts: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(exts) and not path.name.startswith((".", "_"))


def check_format(fmt: str) -> None:
    """Raise `UnknownFormatError` (a `DataError`) unless `fmt` is a known format name."""
    if fmt not in READERS:
        raise UnknownFormatError(
            f"unknown data format {fmt!r}: expected one of {', '.join(FORMATS)}"
        )


def list_shards(path_or_glob: str | Path, fmt: str) -> list[Path]:
    """The shard files of a source, sorted naturally (deterministic).

    Accepts a file, a directory (its files with the format's extensions; searched recursively
    when there are none at the top), a glob (`data/*.tar`, `**` allowed) or a WebDataset brace
    range (`shards/{00000..00009}.tar`, see `expand_braces`); not a URL (`refuse_urls`)."""
    check_format(fmt)
    refuse_urls(str(path_or_glob))
    exts = SHARD_EXTS[fmt]
    found: set[Path] = set()
    for pattern in expand_braces(str(path_or_glob)):
        p = Path(pattern)
        if globlib.has_magic(pattern):
            found.update(
                Path(x) for x in globlib.glob(pattern, recursive=True) if Path(x).is_file()
            )
        elif p.is_dir():
            files = [f for f in p.iterdir() if f.is_file() and _has_ext(f, exts)]
            if not files:
                files = [f for f in p.rglob("*") if f.is_file() and _has_ext(f, exts)]
            found.update(files)
        elif p.is_file():
            found.add(p)
        else:
            raise FileNotFoundError(f"{fmt} source {pattern}: no such file or directory")
    if not found:
        raise FileNotFoundError(
            f"no {fmt} shards found at {path_or_glob} (looked for {', '.join(exts)})"
        )
    return sorted(found, key=_natural_key)


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False for a name too long for the OS (python 3.11 raises for it)."""
    try:
        return path.is_file()
    except OSError:
        return False


def check_sources(sources: Sequence[SourceConfig], key: str = "data.sources") -> None:
    """Fail fast, naming the config key, when a source names no data: a path, glob or brace
    range without a matching file, a LLaVA YAML dataset whose json is missing, or an
    `image_root` that is not a directory. Cheap (no record is read), so callers run it before
    building a model rather than letting a loader worker find out."""
    for i, spec in enumerate(sources):
        where = f"{key}[{i}]"
        try:
            shards = list_shards(spec.path, spec.format)
            if spec.format == "llava_yaml":
                for shard in shards:
                    for ds in llava_yaml_datasets(shard):
                        if not _is_file(Path(ds["json_path"])):
                            raise FileNotFoundError(
                                f"{shard}: dataset {ds['json_path_as_written']}: no such file "
                                f"{ds['json_path']}"
                            )
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{where}.path: {err}") from None
        except DataError as err:
            raise DataError(f"{where}.path: {err}") from None
        if spec.image_root is not None and not Path(spec.image_root).is_dir():
            raise FileNotFoundError(f"{where}.image_root: no such directory {spec.image_root}")


def count_records(path: str | Path, fmt: str) -> int:
    """Raw record count of one file (bad records included), without decoding anything."""
    path = Path(path)
    if fmt == "wds":
        n, last = 0, None
        try:
            with tarfile.open(path, "r:*") as tf:
                while True:
                    m = tf.next()
                    if m is None:
                        break
                    if m.isfile():
                        key = split_key(m.name)[0]
                        n += key != last
                        last = key
        except (tarfile.TarError, OSError, EOFError):
            pass
        return n
    if fmt in ("obelics", "text") and is_parquet(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt in ("mmc4", "text"):
        with open_text(path) as f:
            return sum(1 for line in f if line.strip())
    if fmt == "llava":
        return count_llava_records(path)  # the index the reader then uses (once per process)
    if fmt == "coco":
        return len(coco_entries(path))
    if fmt == "llava_yaml":
        total = 0
        for i, ds in enumerate(llava_yaml_datasets(path)):
            n = count_records(ds["json_path"], "llava")
            where = f"{path}: dataset {ds['json_path_as_written']}"
            total += len(sample_indices(n, ds["sampling_strategy"], random.Random(i), where))
        return total
    check_format(fmt)
    raise AssertionError(f"count_records does not handle format {fmt!r}")


_HEAD_BYTES = 65536
_CHUNK_BYTES = 1 << 20
# A key (not a string value: only keys are followed by `:`) holding a list. Inside a JSON string
# a `"` is always escaped, so `"images"` followed by `:` can only be a key named `images`.
_COCO_KEY = re.compile(rb'"(images|annotations)"\s*:\s*\[')


def _json_head(path: Path) -> bytes:
    """The start of a JSON file from its first non-blank character (a UTF-8 BOM left out)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()


def _has_coco_keys(path: Path) -> bool:
    """Whether the file holds both an `images` and an `annotations` key with list values.

    Scans the raw bytes in chunks for the two keys and stops once both were seen, so nothing is
    parsed or kept in memory; a COCO file's `annotations` key comes after its `images` list, so
    most of the file may be read, but at disk speed. Whether the keys are at the top level is
    not checked here: the reader checks the whole structure and names the file if it is wrong."""
    need = {b"images", b"annotations"}
    tail = b""
    with open(path, "rb") as f:
        while need:
            chunk = f.read(_CHUNK_BYTES)
            if not chunk:
                return False
            buf = tail + chunk
            need.difference_update(m.group(1) for m in _COCO_KEY.finditer(buf))
            tail = buf[-256:]  # a key split across chunks (whitespace before `:` included)
    return True


def _unknown(path: Path | str, why: str) -> UnknownFormatError:
    return UnknownFormatError(
        f"{path}: {why}; give the format explicitly (one of {', '.join(FORMATS)})"
    )


def detect_format(path: str | Path) -> str:
    """Guess the format of a file, directory or glob from extensions and content.

    Raises `FileNotFoundError` for a path (or a glob) that names nothing and
    `UnknownFormatError` (a `DataError`) when the format cannot be told."""
    refuse_urls(str(path))
    p = Path(path)
    magic = globlib.has_magic(str(path))
    if not magic and not p.exists():
        expanded = expand_braces(str(path))
        if expanded != [str(path)]:  # `shards/{000..009}.tar`: detect from the first shard
            return detect_format(expanded[0])
        raise FileNotFoundError(f"{path}: no such file or directory")
    if p.is_dir() or magic:
        all_exts = tuple(sorted({e for exts in SHARD_EXTS.values() for e in exts}))
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
        else:
            files = [Path(x) for x in globlib.glob(str(path), recursive=True)]
            files = [f for f in files if f.is_file()]
            if not files:
                raise FileNotFoundError(f"{path}: no files match")
        candidates = sorted((f for f in files if _has_ext(f, all_exts)), key=_natural_key)
        if not candidates:
            raise _unknown(path, f"no data files with a known extension ({', '.join(all_exts)})")
        return detect_format(candidates[0])
    name = p.name.lower()
    if name.endswith(SHARD_EXTS["wds"]):
        return "wds"
    if name.endswith(SHARD_EXTS["llava_yaml"]):
        return "llava_yaml"
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        names = pq.ParquetFile(p).schema_arrow.names
        return "obelics" if "images" in names and "texts" in names else "text"
    if name.endswith((".jsonl", ".jsonl.gz")):
        with open_text(p) as f:
            first = next((line for line in f if line.strip()), "")
        try:
            obj = json.loads(first)
        except ValueError:
            raise _unknown(p, "first line is not JSON; cannot tell the format") from None
        if isinstance(obj, dict):
            if "conversations" in obj:
                return "llava"
            if "text_list" in obj:
                return "mmc4"
            if "text" in obj:
                return "text"
            raise _unknown(p, f"unrecognised jsonl record keys {sorted(obj)[:10]}")
        raise _unknown(p, f"first line is a JSON {type(obj).__name__}, not an object")
    if name.endswith(".json"):
        head = _json_head(p)
        if head.startswith(b"[") and b'"conversations"' in head:
            return "llava"
        if head.startswith(b"{") and _has_coco_keys(p):
            return "coco"
        raise _unknown(
            p,
            "a .json file that is neither a LLaVA list nor COCO captions (an object with "
            "'images' and 'annotations' lists)",
        )
    raise _unknown(p, "unknown data format (extension not one of the known formats)")


def _render_parts(parts: list[str | Image.Image]) -> str:
    return " ".join(p if isinstance(p, str) else f"<image {p.width}x{p.height}>" for p in parts)


def _render_conversation(conv: Conversation) -> str:
    images = iter(conv.images)

    def tag(_: re.Match[str]) -> str:
        im = next(images, None)
        return f"<image {im.width}x{im.height}>" if im is not None else IMAGE_TAG

    return "\n".join(
        f"{m['role']}: {re.sub(re.escape(IMAGE_TAG), tag, m['content'])}" for m in conv.messages
    )


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def inspect_source(
    path: str | Path,
    fmt: str | None = None,
    n: int = 3,
    count_tokens: Callable[[str], int] | None = None,
    **reader_kwargs: Any,
) -> dict[str, Any]:
    """Summarise a source: format, shard and record counts, and `n` decoded samples as text
    (images shown as `<image WxH>`). A directory holding a synthetic world's `world.json` is
    summarised source by source. With `count_tokens` (e.g. a tokenizer's `len(encode(text))`)
    each sample also gets `text_tokens`, counted on its full text. `reader_kwargs` go to the
    reader (e.g. `image_folder`)."""
    refuse_urls(str(path))
    p = Path(path)
    if fmt is None and p.is_dir() and (p / "world.json").is_file():
        return _inspect_world(p, n, count_tokens)
    if fmt is not None:
        check_format(fmt)
    fmt = fmt or detect_format(path)
    shards = [p] if fmt == "llava_yaml" else list_shards(path, fmt)
    records = sum(count_records(s, fmt) for s in shards)
    stats = ReadStats()
    samples: list[dict[str, Any]] = []
    reader = READERS[fmt]
    for shard in shards:
        if len(samples) >= n:
            break
        for rec in reader(shard, stats=stats, **reader_kwargs):
            samples.append(_sample_summary(rec, count_tokens))
            if len(samples) >= n:
                break
    return {
        "path": str(path),
        "format": fmt,
        "shards": len(shards),
        "first_shards": [str(s) for s in shards[:3]],
        "records": records,
        "samples": samples,
        "stats": stats.to_dict(),
    }


def _sample_summary(
    rec: Document | Conversation, count_tokens: Callable[[str], int] | None
) -> dict[str, Any]:
    """A decoded record as shown by `inspect_source` (text clipped, images as markers)."""
    if isinstance(rec, Conversation):
        text, n_images = _render_conversation(rec), len(rec.images)
        plain = " ".join(m["content"] for m in rec.messages)
    else:
        text, n_images = _render_parts(rec.parts), rec.num_images
        plain = "".join(p for p in rec.parts if isinstance(p, str))
    out = {"id": rec.id, "kind": rec.kind, "images": n_images, "text": _clip(text)}
    if count_tokens is not None:
        out["text_tokens"] = count_tokens(plain.replace(IMAGE_TAG, ""))
    return out


def _inspect_world(
    root: Path, n: int, count_tokens: Callable[[str], int] | None = None
) -> dict[str, Any]:
    world = read_json(root / "world.json")
    sources = {}
    for name, src in world["sources"].items():
        fmt = src["format"]
        shards = [root / s for s in src["shards"]]
        kwargs: dict[str, Any] = {}
        if fmt == "mmc4":
            kwargs["image_dir"] = root / src["image_dir"]
        if fmt == "llava":
            kwargs["image_folder"] = root / src["image_folder"]
        stats = ReadStats()
        samples = []
        for rec in READERS[fmt](shards[0], stats=stats, **kwargs):
            samples.append(_sample_summary(rec, count_tokens))
            if len(samples) >= n:
                break
        sources[name] = {
            "kind": src["kind"],
            "format": fmt,
            "shards": len(shards),
            "records": src["records"],
            "images": src.get("images", 0),
            "samples": samples,
        }
    return {
        "path": str(root),
        "format": "world",
        "seed": world["seed"],
        "size": world["size"],
        "image_size": world["image_size"],
        "sources": sources,
        "eval": world["eval"],
    }
