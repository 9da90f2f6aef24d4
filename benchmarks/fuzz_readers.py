"""Fuzz every data reader with malformed inputs and classify what each does.

    python -m benchmarks.fuzz_readers --cases 200 --seed 0 [--out PATH] [--stats-every 4]

Each case writes a small valid input of one format (WebDataset tar, OBELICS parquet, MMC4
jsonl, text jsonl / jsonl.gz / parquet, LLaVA json / jsonl / YAML, COCO captions), breaks it
one way, and reads it in a forked child under a time and memory limit. The named cases are
hand-picked (wrong JSON types, deep nesting, huge lines, absurd image headers, small gzip bombs,
odd tar member names, BOMs, CRLF, wrong parquet schemas, symlink loops, ...); `--cases N` adds
N random ones (bit flips and truncation at random offsets, a wrong value in a random field).
Every `--stats-every`-th case also runs `packing_stats` (what `mm1 data stats` runs) on a
source pointing at the broken file.

Results, per case:
    ok           the reader finished; bad records were skipped and counted under a reason
    clean error  one line naming the file (DataError / FileNotFoundError / ValueError)
    CRASH        any other exception, a multi-line error, a hang, a memory blow-up, or output
                 that breaks the contract (a record with text that is not valid Unicode, an
                 image that is not RGB)

The JSON (default benchmarks/results/fuzz_readers.json) holds every case; the table is printed.
The exit status is 1 when some case crashed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import multiprocessing as mp
import random
import resource
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

TIME_LIMIT_S = 20.0
MEMORY_LIMIT_BYTES = 2 << 30  # on top of what the parent process already maps

# ----------------------------------------------------------------------------------------------
# Small valid inputs, one builder per format
# ----------------------------------------------------------------------------------------------


def png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (width * 9 % 256, 60, 120)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, width * 9 % 256, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@dataclass
class Target:
    """A reader input: its format, the file the reader gets, the file a mutation breaks (the
    data file unless an image or a YAML's json is the point), and the JSON records it holds."""

    format: str
    path: Path
    records: list[Any] = field(default_factory=list)
    layout: str = ""  # json | jsonl | jsonl.gz | parquet | tar | yaml

    def write_records(self, records: Any, raw_json: str | None = None) -> None:
        """Rewrite the data file from (mutated) records, in this target's layout."""
        path = self.json_file
        if self.layout == "json":
            path.write_text(raw_json if raw_json is not None else json.dumps(records))
        elif self.layout in ("jsonl", "jsonl.gz"):
            text = (
                raw_json if raw_json is not None else "".join(json.dumps(r) + "\n" for r in records)
            )
            data = text.encode("utf-8", errors="surrogatepass")
            path.write_bytes(gzip.compress(data) if self.layout == "jsonl.gz" else data)
        else:
            raise ValueError(f"{self.layout} holds no JSON records")

    @property
    def json_file(self) -> Path:
        if self.format == "llava_yaml":
            return self.path.parent / "llava.json"
        return self.path


def build_wds(d: Path) -> Target:
    members = []
    for i in range(3):
        key = f"{i:05d}"
        img = png(8 + i) if i == 1 else jpeg(8 + i)
        members += [
            (f"{key}.{'png' if i == 1 else 'jpg'}", img),
            (f"{key}.txt", f"caption {i}".encode()),
            (f"{key}.json", json.dumps({"key": key, "caption": f"caption {i}"}).encode()),
        ]
    write_tar(d / "shard.tar", members)
    return Target("wds", d / "shard.tar", layout="tar")


def build_obelics(d: Path, table: pa.Table | None = None) -> Target:
    (d / "img").mkdir(exist_ok=True)
    (d / "img" / "a.png").write_bytes(png(9))
    if table is None:
        table = pa.table(
            {
                "images": [[png(8), None], [None, "img/a.png", None], [None]],
                "texts": [[None, "first text"], ["before", None, "after"], ["only text"]],
                "metadata": ['[{"k": 1}]', None, "[]"],
                "general_metadata": ['{"url": "u"}', "{}", None],
            }
        )
    pq.write_table(table, d / "obelics.parquet")
    return Target("obelics", d / "obelics.parquet", layout="parquet")


def build_mmc4(d: Path) -> Target:
    (d / "images").mkdir(exist_ok=True)
    records = []
    for i in range(3):
        (d / "images" / f"{i}.jpg").write_bytes(jpeg(8 + i))
        records.append(
            {
                "text_list": [f"sentence {i} one.", f"sentence {i} two."],
                "image_info": [
                    {
                        "image_name": f"{i}.jpg",
                        "raw_url": f"http://x/{i}.jpg",
                        "matched_text_index": i % 2,
                        "matched_sim": 0.3,
                    }
                ],
                "url": f"http://x/{i}",
            }
        )
    t = Target("mmc4", d / "mmc4.jsonl", records, "jsonl")
    t.write_records(records)
    return t


def build_text(d: Path, layout: str) -> Target:
    records = [{"id": f"t{i}", "text": f"document {i} text.", "meta": {"n": i}} for i in range(3)]
    if layout == "parquet":
        pq.write_table(pa.Table.from_pylist(records), d / "text.parquet")
        return Target("text", d / "text.parquet", records, "parquet")
    t = Target("text", d / f"text.{layout}", records, layout)
    t.write_records(records)
    return t


def _llava_records() -> list[dict[str, Any]]:
    return [
        {
            "id": f"c{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is {i}?"},
                {"from": "gpt", "value": f"It is {i}."},
            ],
        }
        for i in range(3)
    ] + [
        {
            "id": "t",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
        }
    ]


def build_llava(d: Path, layout: str) -> Target:
    (d / "images").mkdir(exist_ok=True)
    for i in range(3):
        (d / "images" / f"{i}.png").write_bytes(png(8 + i))
    records = _llava_records()
    t = Target("llava", d / f"llava.{layout}", records, layout)
    t.write_records(records)
    return t


def build_llava_yaml(d: Path) -> Target:
    inner = build_llava(d, "json")
    (d / "data.yaml").write_text(
        "datasets:\n  - json_path: llava.json\n    sampling_strategy: all\n"
        "  - json_path: llava.json\n    sampling_strategy: first:50%\n"
    )
    return Target("llava_yaml", d / "data.yaml", inner.records, "json")


def build_coco(d: Path) -> Target:
    (d / "images").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(3):
        (d / "images" / f"{i}.jpg").write_bytes(jpeg(8 + i))
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 8 + i, "height": 8})
        annotations.append({"id": 100 + i, "image_id": i, "caption": f"a thing {i}."})
    data = {"images": images, "annotations": annotations, "info": {"v": 1}}
    t = Target("coco", d / "captions.json", [data], "json")
    (d / "captions.json").write_text(json.dumps(data))
    return t


def build_wds_gz(d: Path) -> Target:
    t = build_wds(d)
    gz = d / "shard.tar.gz"
    gz.write_bytes(gzip.compress(t.path.read_bytes()))
    t.path.unlink()
    return Target("wds", gz, layout="tar.gz")


BUILDERS: dict[str, Callable[[Path], Target]] = {
    "wds": build_wds,
    "wds.tar.gz": build_wds_gz,
    "obelics": build_obelics,
    "mmc4": build_mmc4,
    "text.jsonl": lambda d: build_text(d, "jsonl"),
    "text.jsonl.gz": lambda d: build_text(d, "jsonl.gz"),
    "text.parquet": lambda d: build_text(d, "parquet"),
    "llava.json": lambda d: build_llava(d, "json"),
    "llava.jsonl": lambda d: build_llava(d, "jsonl"),
    "llava_yaml": build_llava_yaml,
    "coco": build_coco,
}
JSON_INPUTS = ("mmc4", "text.jsonl", "text.jsonl.gz", "llava.json", "llava.jsonl", "llava_yaml")


def _records_of(t: Target) -> list[Any]:
    """The records as written, the COCO file's one object unwrapped for field mutations."""
    return t.records


def _write_mutated(t: Target, records: list[Any]) -> None:
    if t.format == "coco":
        t.path.write_text(json.dumps(records[0]))
    else:
        t.write_records(records)


# ----------------------------------------------------------------------------------------------
# Mutations
# ----------------------------------------------------------------------------------------------

BAD_VALUES: dict[str, Any] = {
    "null": None,
    "zero": 0,
    "negative": -1,
    "huge int": 10**30,
    "int64 max": 2**63 - 1,
    "huge float": 1e308,
    "NaN": math.nan,
    "Infinity": math.inf,
    "true": True,
    "empty string": "",
    "empty list": [],
    "empty dict": {},
    "list of null": [None],
    "nested dict": {"a": {"b": [1, {"c": None}]}},
    "lone surrogate": "\udfff\ud800",
    "NUL bytes": "a\x00b",
    "long string (1 MB)": "x" * (1 << 20),
}


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (containers included), the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for k, v in items:
        out.append((*prefix, k))
        out += leaf_paths(v, (*prefix, k))
    return out


def set_path(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    value = json.loads(json.dumps(value))
    cur = value
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = new
    return value


def flip_bits(path: Path, rng: random.Random, n: int) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return "empty"
    offsets = sorted(rng.randrange(len(data)) for _ in range(n))
    for o in offsets:
        data[o] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"{n} bit(s) at {offsets[:4]}{'...' if n > 4 else ''} of {len(data)}"


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    cut = rng.randrange(len(data)) if data else 0
    path.write_bytes(data[:cut])
    return f"cut at {cut} of {len(data)}"


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` (valid CRC), with a tiny IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _bomb_png(side: int) -> bytes:
    """A valid, all-black PNG of side x side: tiny on disk, side^2 * 3 bytes decoded."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def _nested_dict(depth: int) -> Any:
    v: Any = "leaf"
    for _ in range(depth):
        v = {"a": v}
    return v


# A case: a name, the input it breaks, and a function that breaks it (returns a detail line).
Mutation = Callable[[Target, Path], str]


@dataclass
class Case:
    name: str
    input: str
    mutate: Mutation
    stats: bool = False  # also run packing_stats (`mm1 data stats`) over it


def _image_file(t: Target, d: Path) -> Path:
    for sub in ("images", "img"):
        files = sorted((d / sub).glob("*")) if (d / sub).is_dir() else []
        if files:
            return files[0]
    raise ValueError(f"{t.format} has no image files")


def _replace_image(image: bytes | Callable[[], bytes]) -> Mutation:
    """Replace the first image with `image` (bytes, or a function making them when the case
    runs: some are slow to encode)."""

    def mutate(t: Target, d: Path) -> str:
        data = image() if callable(image) else image
        if t.format == "wds":
            members = _tar_members(t.path)
            members[0] = (members[0][0], data)
            write_tar(t.path, members)
        elif t.format == "obelics":
            table = pq.read_table(t.path).to_pydict()
            table["images"][0][0] = data
            build_obelics(d, pa.table(table))
        else:
            _image_file(t, d).write_bytes(data)
        return f"first image: {len(data)} bytes"

    return mutate


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]  # type: ignore[union-attr]


def _tar_rename(new: Callable[[str], str]) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        members = [(new(n) if n.startswith("00001.") else n, b) for n, b in _tar_members(t.path)]
        write_tar(t.path, members)
        return f"sample 1 named {members[3][0][:60]!r}"

    return mutate


def _tar_member_data(ext: str, data: bytes) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        members = [(n, data if n == f"00000.{ext}" else b) for n, b in _tar_members(t.path)]
        write_tar(t.path, members)
        return f"00000.{ext}: {len(data)} bytes"

    return mutate


def _raw_text(transform: Callable[[str], str]) -> Mutation:
    """Rewrite a JSON-bearing file's text (decompressing a .gz around it)."""

    def mutate(t: Target, d: Path) -> str:
        path = t.json_file
        raw = path.read_bytes()
        gz = path.name.endswith(".gz")
        text = (gzip.decompress(raw) if gz else raw).decode()
        new = transform(text).encode("utf-8", errors="surrogatepass")
        path.write_bytes(gzip.compress(new) if gz else new)
        return f"{len(raw)} -> {len(new)} bytes"

    return mutate


def _raw_bytes(transform: Callable[[bytes], bytes]) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        path = t.json_file
        raw = path.read_bytes()
        gz = path.name.endswith(".gz")
        new = transform(gzip.decompress(raw) if gz else raw)
        path.write_bytes(gzip.compress(new) if gz else new)
        return f"{len(new)} bytes"

    return mutate


def _first_record_value(path_in_record: tuple[Any, ...], value: Any) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        records = _records_of(t)
        _write_mutated(t, [set_path(records[0], path_in_record, value), *records[1:]])
        return f"record 0 {'.'.join(map(str, path_in_record))} = {json.dumps(value)[:40]}"

    return mutate


def _whole(transform: Callable[[Target, Path], None], detail: str) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        transform(t, d)
        return detail

    return mutate


def _replace_with_dir(t: Target, d: Path) -> None:
    p = t.json_file if t.format == "llava_yaml" else t.path
    p.unlink()
    p.mkdir()


def _symlink_loop(t: Target, d: Path) -> None:
    p = t.json_file if t.format == "llava_yaml" else t.path
    p.unlink()
    (d / "loop_b").symlink_to(p)
    p.symlink_to(d / "loop_b")


def _image_symlink_loop(t: Target, d: Path) -> None:
    img = _image_file(t, d)
    img.unlink()
    (d / "iloop").symlink_to(img)
    img.symlink_to(d / "iloop")


def _image_is_dir(t: Target, d: Path) -> None:
    img = _image_file(t, d)
    img.unlink()
    img.mkdir()


def _gzip_bomb(t: Target, d: Path) -> None:
    # 256 MB of one line without a newline, about 250 kB compressed
    with gzip.open(t.path, "wb", compresslevel=9) as f:
        f.write(b'{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(256):
            f.write(chunk)
        f.write(b'"}\n')


def _tar_gz_bomb(t: Target, d: Path) -> None:
    # a .tar.gz whose caption member is 256 MB of zeros (~250 kB on disk)
    t.path.unlink()
    big = t.path.with_name("shard.tar.gz")
    with tarfile.open(big, "w:gz") as tf:
        for name, data in [("00000.jpg", jpeg()), ("00000.txt", None)]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.size = 256 << 20
                tf.addfile(info, _Zeros(info.size))
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    t.path = big


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _parquet(table: pa.Table) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        pq.write_table(table, t.path)
        return str(table.schema).replace("\n", "; ")[:80]

    return mutate


def _yaml(text: str) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        t.path.write_text(text)
        return text.replace("\n", " ")[:60]

    return mutate


def _named_cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # -- empty files and files that are not files -----------------------------------------------
    for inp in BUILDERS:
        add(
            Case(
                "empty file (0 bytes)",
                inp,
                _whole(lambda t, d: t.json_file.write_bytes(b""), "0 bytes"),
                stats=True,
            )
        )
        add(
            Case(
                "directory where the file is expected",
                inp,
                _whole(_replace_with_dir, "a directory"),
            )
        )
        add(Case("symlink loop as the file", inp, _whole(_symlink_loop, "a -> b -> a")))
    # -- images ---------------------------------------------------------------------------------
    for inp in ("wds", "obelics", "mmc4", "llava.json", "coco"):
        add(Case("0-byte image", inp, _replace_image(b""), stats=inp == "wds"))
        add(
            Case(
                "PNG header claiming 100000x100000",
                inp,
                _replace_image(_png_header(100000, 100000)),
            )
        )
        add(
            Case(
                "PNG header claiming 12000x12000 (under PIL's bomb limit)",
                inp,
                _replace_image(_png_header(12000, 12000)),
            )
        )
        add(Case("PNG header claiming 0x0", inp, _replace_image(_png_header(0, 0))))
        add(
            Case("PNG header claiming 1x2147483647", inp, _replace_image(_png_header(1, 2**31 - 1)))
        )
        add(
            Case(
                "valid all-black PNG 10000x10000 (decompression bomb)",
                inp,
                _replace_image(lambda: _bomb_png(10000)),
            )
        )
        add(Case("JPEG truncated to its header", inp, _replace_image(jpeg(64, 64)[:200])))
        add(
            Case("GIF bytes in a .jpg", inp, _replace_image(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"))
        )
        add(Case("HTML page as the image", inp, _replace_image(b"<!DOCTYPE html><html>404</html>")))
    for inp in ("mmc4", "llava.json", "coco"):
        add(Case("image is a directory", inp, _whole(_image_is_dir, "a directory")))
        add(Case("image is a symlink loop", inp, _whole(_image_symlink_loop, "a -> b -> a")))
    # -- image paths in records -----------------------------------------------------------------
    path_fields = {
        "mmc4": ("image_info", 0, "image_name"),
        "llava.json": ("image",),
        "llava.jsonl": ("image",),
        "llava_yaml": ("image",),
    }
    for inp, pth in path_fields.items():
        for label, value in (
            ("very long image path (5000 chars)", "a" * 5000),
            ("very long path component chain", "/".join(["d"] * 3000)),
            ("image path with NUL byte", "a\x00b.png"),
            ("image path '.'", "."),
            ("image path '' (empty)", ""),
            ("image path '..'", ".."),
            ("image path '/dev/zero'", "/dev/zero"),
        ):
            add(Case(label, inp, _first_record_value(pth, value)))
    add(
        Case(
            "very long file_name (5000 chars)",
            "coco",
            _first_record_value(("images", 0, "file_name"), "a" * 5000),
        )
    )
    add(
        Case(
            "file_name with NUL byte",
            "coco",
            _first_record_value(("images", 0, "file_name"), "a\x00b"),
        )
    )
    # -- JSON structure -------------------------------------------------------------------------
    for inp in (*JSON_INPUTS, "coco"):
        add(
            Case(
                "deeply nested JSON (100000 levels)",
                inp,
                _raw_text(lambda s: _deep_json(100000) + "\n" + s),
                stats=True,
            )
        )
        add(
            Case(
                "nested JSON 900 levels in a field",
                inp,
                _raw_text(
                    lambda s: s.replace(
                        '{"', '{"deep": ' + json.dumps(_nested_dict(900)) + ', "', 1
                    )
                ),
            )
        )
        add(Case("UTF-8 BOM", inp, _raw_bytes(lambda b: b"\xef\xbb\xbf" + b)))
        add(Case("UTF-16 LE with BOM", inp, _raw_bytes(lambda b: b.decode().encode("utf-16"))))
        add(Case("CRLF line ends", inp, _raw_bytes(lambda b: b.replace(b"\n", b"\r\n"))))
        add(
            Case(
                "latin-1 bytes in a string", inp, _raw_bytes(lambda b: b.replace(b"1", b"\xe91", 3))
            )
        )
        add(
            Case(
                "duplicate keys",
                inp,
                _raw_text(
                    lambda s: s.replace(
                        '{"',
                        '{"id": 1, "text_list": 5, "conversations": 7, "text": null, "images": 3, "',
                        1,
                    )
                ),
            )
        )
        add(
            Case(
                "NaN / Infinity literals",
                inp,
                _raw_text(lambda s: s.replace('{"', '{"x": NaN, "y": -Infinity, "', 1)),
            )
        )
        add(
            Case(
                "huge number literal (1e999999, 100000 digits)",
                inp,
                _raw_text(
                    lambda s: s.replace('{"', '{"x": 1e999999, "y": ' + "9" * 100000 + ', "', 1)
                ),
            )
        )
        add(
            Case(
                "extremely long line (32 MB string)",
                inp,
                _raw_text(lambda s: s.replace('{"', '{"pad": "' + "x" * (32 << 20) + '", "', 1)),
            )
        )
        add(
            Case(
                "truncated in the middle of a string",
                inp,
                _raw_text(lambda s: s[: s.index("sentence" if "sentence" in s else "t") + 3]),
            )
        )
        add(Case("only whitespace", inp, _raw_text(lambda s: " \n\t\r\n ")))
        add(Case("top-level JSON scalar", inp, _raw_text(lambda s: "42\n")))
        add(Case("top-level JSON null", inp, _raw_text(lambda s: "null\n")))
    # -- wrong JSON types in every field --------------------------------------------------------
    # built in _type_cases (every field x every bad value is too many for the named list: the
    # random cases draw from it); here one value per field, the one most likely to bite: null.
    # -- gzip -----------------------------------------------------------------------------------
    add(
        Case(
            "gzip bomb: 256 MB line from 250 kB",
            "text.jsonl.gz",
            _whole(_gzip_bomb, "256 MB"),
            stats=True,
        )
    )
    add(
        Case("gzip cut in the middle", "text.jsonl.gz", _raw_bytes(lambda b: b))
    )  # overridden below
    cases[-1] = Case(
        "gzip stream cut in the middle",
        "text.jsonl.gz",
        _whole(lambda t, d: t.path.write_bytes(t.path.read_bytes()[:30]), "first 30 bytes"),
    )
    add(
        Case(
            "plain text in a .jsonl.gz",
            "text.jsonl.gz",
            _whole(lambda t, d: t.path.write_text('{"text": "x"}\n'), "not gzip"),
        )
    )
    add(
        Case(
            "two concatenated gzip members",
            "text.jsonl.gz",
            _whole(lambda t, d: t.path.write_bytes(t.path.read_bytes() * 2), "x2"),
        )
    )
    # -- tar ------------------------------------------------------------------------------------
    add(Case("tar member named ../../etc/x", "wds", _tar_rename(lambda n: "../../etc/" + n)))
    add(Case("tar member with absolute name", "wds", _tar_rename(lambda n: "/abs/dir/" + n)))
    add(Case("tar member name 300 chars (PAX)", "wds", _tar_rename(lambda n: "d" * 300 + "/" + n)))
    add(Case("tar member name 100 KB (PAX)", "wds", _tar_rename(lambda n: "d" * 100000 + n)))
    add(Case("tar member name without extension", "wds", _tar_rename(lambda n: n.split(".")[0])))
    add(
        Case(
            "tar member name with many dots",
            "wds",
            _tar_rename(lambda n: n.replace(".", ".a.b.c.")),
        )
    )
    add(
        Case(
            "tar member name with newline and NUL-free control chars",
            "wds",
            _tar_rename(lambda n: "a\nb\x01" + n),
        )
    )
    add(
        Case(
            "duplicate tar members (same key twice)",
            "wds",
            _whole(lambda t, d: write_tar(t.path, _tar_members(t.path) * 2), "x2"),
        )
    )
    add(
        Case(
            "json member: deeply nested",
            "wds",
            _tar_member_data("json", _deep_json(100000).encode()),
            stats=True,
        )
    )
    add(Case("json member: a list, not an object", "wds", _tar_member_data("json", b"[1, 2]")))
    add(
        Case("json member: caption is a number", "wds", _tar_member_data("json", b'{"caption": 5}'))
    )
    add(Case("txt member: 0 bytes", "wds", _tar_member_data("txt", b"")))
    add(
        Case(
            "txt member: UTF-16 with BOM",
            "wds",
            _tar_member_data("txt", "caption".encode("utf-16")),
        )
    )
    add(Case("txt member: 16 MB", "wds", _tar_member_data("txt", b"w " * (8 << 20))))
    add(Case("tar.gz bomb: 256 MB caption member", "wds", _whole(_tar_gz_bomb, "256 MB of zeros")))
    add(
        Case("tar with a symlink member", "wds", _whole(_tar_with_link, "00000.jpg -> /etc/passwd"))
    )
    add(
        Case(
            "tar member size field larger than the file", "wds", _whole(_tar_bad_size, "size 10 MB")
        )
    )
    # -- parquet --------------------------------------------------------------------------------
    add(
        Case(
            "images: list<int64>",
            "obelics",
            _parquet(pa.table({"images": [[1, None]], "texts": [[None, "t"]]})),
        )
    )
    add(
        Case(
            "images: a string column",
            "obelics",
            _parquet(pa.table({"images": ["x.png"], "texts": ["t"]})),
        )
    )
    add(
        Case(
            "texts: list<int64>",
            "obelics",
            _parquet(pa.table({"images": [[None]], "texts": [[7]]})),
        )
    )
    add(
        Case(
            "texts: list<list<string>>",
            "obelics",
            _parquet(pa.table({"images": [[None]], "texts": [[["a"]]]})),
        )
    )
    add(
        Case(
            "images: struct with string bytes",
            "obelics",
            _parquet(
                pa.table({"images": [[{"bytes": "not bytes", "path": None}]], "texts": [[None]]})
            ),
        )
    )
    add(
        Case(
            "images: struct with int64 bytes (10**10)",
            "obelics",
            _parquet(pa.table({"images": [[{"bytes": 10**10, "path": None}]], "texts": [[None]]})),
            stats=True,
        )
    )
    add(
        Case(
            "images: struct with list<double> bytes",
            "obelics",
            _parquet(
                pa.table({"images": [[{"bytes": [1.5, 2.0], "path": None}]], "texts": [[None]]})
            ),
        )
    )
    add(
        Case(
            "images: struct with int path",
            "obelics",
            _parquet(pa.table({"images": [[{"bytes": None, "path": 3}]], "texts": [[None]]})),
        )
    )
    add(
        Case(
            "images: map<string,string>",
            "obelics",
            _parquet(
                pa.table(
                    {
                        "images": pa.array(
                            [[[("bytes", "x")]]], pa.list_(pa.map_(pa.string(), pa.string()))
                        ),
                        "texts": [[None]],
                    }
                )
            ),
        )
    )
    add(
        Case(
            "images: list<binary> of 0-byte values",
            "obelics",
            _parquet(pa.table({"images": [[b""]], "texts": [[None]]})),
        )
    )
    add(
        Case(
            "images: dictionary-encoded strings",
            "obelics",
            _parquet(
                pa.table(
                    {
                        "images": pa.array(
                            [["img/a.png"]], pa.list_(pa.dictionary(pa.int32(), pa.string()))
                        ),
                        "texts": [[None]],
                    }
                )
            ),
        )
    )
    add(
        Case(
            "images/texts lists of different lengths",
            "obelics",
            _parquet(pa.table({"images": [[None, None]], "texts": [["a"]]})),
        )
    )
    add(
        Case(
            "metadata: list<int> instead of JSON string",
            "obelics",
            _parquet(pa.table({"images": [[None]], "texts": [["a"]], "metadata": [[1, 2]]})),
        )
    )
    add(
        Case(
            "no rows (schema only)",
            "obelics",
            _parquet(
                pa.table(
                    {
                        "images": pa.array([], pa.list_(pa.binary())),
                        "texts": pa.array([], pa.list_(pa.string())),
                    }
                )
            ),
        )
    )
    add(Case("missing `texts` column", "obelics", _parquet(pa.table({"images": [[None]]}))))
    add(Case("text: int64 column", "text.parquet", _parquet(pa.table({"text": [1, 2]}))))
    add(
        Case(
            "text: binary column with non-UTF-8 bytes",
            "text.parquet",
            _parquet(pa.table({"text": pa.array([b"caf\xe9"], pa.binary())})),
        )
    )
    add(
        Case(
            "text: list<string> column", "text.parquet", _parquet(pa.table({"text": [["a", "b"]]}))
        )
    )
    add(
        Case(
            "text: large_string column, 32 MB value",
            "text.parquet",
            _parquet(pa.table({"text": pa.array(["y" * (32 << 20)], pa.large_string())})),
        )
    )
    add(
        Case(
            "text: struct id column",
            "text.parquet",
            _parquet(pa.table({"text": ["a"], "id": [{"x": 1}]})),
        )
    )
    add(Case("missing `text` column", "text.parquet", _parquet(pa.table({"body": ["a"]}))))
    add(
        Case(
            "parquet footer only (PAR1PAR1)",
            "text.parquet",
            _whole(lambda t, d: t.path.write_bytes(b"PAR1PAR1"), "8 bytes"),
        )
    )
    # -- YAML -----------------------------------------------------------------------------------
    for label, text in (
        (
            "YAML: image_folder is a number",
            "datasets:\n  - json_path: llava.json\n    image_folder: 5\n",
        ),
        (
            "YAML: image_folder is a list",
            "datasets:\n  - json_path: llava.json\n    image_folder: [a, b]\n",
        ),
        (
            "YAML: sampling_strategy random:inf%",
            "datasets:\n  - json_path: llava.json\n    sampling_strategy: random:inf%\n",
        ),
        (
            "YAML: sampling_strategy first:1e400%",
            "datasets:\n  - json_path: llava.json\n    sampling_strategy: first:1e400%\n",
        ),
        (
            "YAML: sampling_strategy first:nan%",
            "datasets:\n  - json_path: llava.json\n    sampling_strategy: first:nan%\n",
        ),
        (
            "YAML: sampling_strategy end:-5",
            "datasets:\n  - json_path: llava.json\n    sampling_strategy: end:-5\n",
        ),
        (
            "YAML: sampling_strategy is a dict",
            "datasets:\n  - json_path: llava.json\n    sampling_strategy: {a: 1}\n",
        ),
        ("YAML: json_path is a directory", "datasets:\n  - json_path: .\n"),
        ("YAML: json_path with NUL", 'datasets:\n  - json_path: "a\\0b"\n'),
        ("YAML: json_path 5000 chars", "datasets:\n  - json_path: " + "a" * 5000 + "\n"),
        ("YAML: json_path points at itself", "datasets:\n  - json_path: data.yaml\n"),
        ("YAML: 100000 nested lists", "datasets: " + "[" * 100000 + "]" * 100000 + "\n"),
        (
            "YAML: alias bomb",
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ndatasets: [*d]\n",
        ),
        ("YAML: python object tag", "datasets: !!python/object/apply:os.system ['true']\n"),
        ("YAML: tab indentation", "datasets:\n\t- json_path: llava.json\n"),
        ("YAML: duplicate keys", "datasets: []\ndatasets:\n  - json_path: llava.json\n"),
        ("YAML: binary garbage", "\x00\x01\x02 \xff"),
    ):
        add(Case(label, "llava_yaml", _yaml(text), stats=label.endswith("inf%")))
    return cases


def _tar_with_link(t: Target, d: Path) -> None:
    members = _tar_members(t.path)
    with tarfile.open(t.path, "w") as tf:
        info = tarfile.TarInfo("00000.jpg")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
        for name, data in members:
            if name != "00000.jpg":
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _tar_bad_size(t: Target, d: Path) -> None:
    raw = bytearray(t.path.read_bytes())
    # the first header's size field (offset 124, 12 octal bytes); PAX writes a header first,
    # so patch every ustar header whose name is 00000.jpg
    i = raw.find(b"00000.jpg\x00")
    raw[i + 124 : i + 136] = b"%011o\x00" % (10 << 20)
    chksum = sum(raw[i : i + 148]) + 8 * 32 + sum(raw[i + 156 : i + 512])
    raw[i + 148 : i + 156] = b"%06o\x00 " % chksum
    t.path.write_bytes(bytes(raw))


# -- random cases -----------------------------------------------------------------------------


def _random_cases(n: int, seed: int) -> list[tuple[Case, int]]:
    """`n` cases drawn with `seed`; each carries its own seed for its random offsets."""
    rng = random.Random(seed)
    base: dict[str, Target] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for inp in (*JSON_INPUTS, "coco"):
            d = Path(tmp) / inp
            d.mkdir()
            base[inp] = BUILDERS[inp](d)
    out = []
    for _ in range(n):
        kind = rng.choice(
            ["bitflip", "bitflip", "truncate", "image bitflip", "wrong type", "wrong type"]
        )
        case_seed = rng.randrange(2**32)
        if kind == "wrong type":
            inp = rng.choice([*JSON_INPUTS, "coco"])
            paths = leaf_paths(base[inp].records[0])
            pth = rng.choice(paths)
            label = rng.choice(sorted(BAD_VALUES))
            name = f"{'.'.join(map(str, pth))} = {label}"
            out.append((Case(name, inp, _first_record_value(pth, BAD_VALUES[label])), case_seed))
        elif kind == "image bitflip":
            inp = rng.choice(["wds", "obelics", "mmc4", "llava.json", "coco"])
            out.append((Case("image bit flips", inp, _image_flip(case_seed)), case_seed))
        else:
            inp = rng.choice(list(BUILDERS))
            mut = _data_flip(case_seed) if kind == "bitflip" else _data_truncate(case_seed)
            out.append((Case(f"data file {kind}", inp, mut), case_seed))
    return out


def _data_flip(seed: int) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        rng = random.Random(seed)
        return flip_bits(t.json_file, rng, rng.choice([1, 2, 8, 64]))

    return mutate


def _data_truncate(seed: int) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        return truncate(t.json_file, random.Random(seed))

    return mutate


def _image_flip(seed: int) -> Mutation:
    def mutate(t: Target, d: Path) -> str:
        rng = random.Random(seed)
        n = rng.choice([1, 4, 16])
        if t.format in ("wds", "obelics"):
            img = jpeg(16, 16) if rng.random() < 0.5 else png(16, 16)
            data = bytearray(img)
            for _ in range(n):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            return _replace_image(bytes(data))(t, d) + f", {n} bit(s) flipped"
        return flip_bits(_image_file(t, d), rng, n)

    return mutate


# ----------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------


def _check_output(record: Any) -> str | None:
    """What is wrong with a yielded record, or None."""
    from mm1.data.document import Conversation

    texts: list[Any] = []
    images: list[Any] = []
    if isinstance(record, Conversation):
        texts = [m.get("content") for m in record.messages] + [
            m.get("role") for m in record.messages
        ]
        images = list(record.images)
    else:
        for p in record.parts:
            (images if isinstance(p, Image.Image) else texts).append(p)
    for t in [*texts, record.id]:
        if not isinstance(t, str):
            return f"a text part is a {type(t).__name__}"
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            return f"text that is not valid Unicode: {t[:40]!r}"
    for im in images:
        if not isinstance(im, Image.Image) or im.mode != "RGB" or 0 in im.size:
            return f"bad image {im!r:.60}"
    return None


def _read(t: Target, stats_run: bool, tokenizer_dir: str) -> dict[str, Any]:
    from mm1.data.sources import READERS, ReadStats

    stats = ReadStats()
    bad_output = None
    for record in READERS[t.format](t.path, stats=stats):
        bad_output = bad_output or _check_output(record)
    out: dict[str, Any] = {"read": stats.to_dict(), "bad_output": bad_output}
    if stats_run:
        out["data_stats"] = _data_stats(t, tokenizer_dir)
    return out


def _data_stats(t: Target, tokenizer_dir: str) -> dict[str, Any]:
    """What `mm1 data stats` does over a config whose one source is `t`."""
    from mm1.config import SourceConfig
    from mm1.data.catalog import check_sources
    from mm1.data.loader import LoaderSettings, packing_stats
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.sources import DataError
    from mm1.data.tokenizer import Tokenizer

    settings = LoaderSettings(
        sources=[SourceConfig(format=t.format, path=str(t.path))],
        seq_len=64,
        micro_batch_size=1,
        prompt_format=PromptFormat(4),
    )
    try:
        check_sources(settings.sources)  # as prepare_data does before building a model
        s = packing_stats(settings, Tokenizer.from_file(tokenizer_dir), 4)
    except (DataError, FileNotFoundError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"records": s["read"]["records"], "skipped": s["read"]["skipped"]}


def _child(conn: Any, case: Case, case_seed: int, stats_run: bool, tokenizer_dir: str) -> None:
    soft = MEMORY_LIMIT_BYTES + _mapped_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
    logging_off()
    result: dict[str, Any]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        try:
            t = BUILDERS[case.input](d)
            random.seed(case_seed)
            detail = case.mutate(t, d)
        except Exception as e:  # the harness's own failure, not the reader's
            conn.send({"status": "harness error", "detail": f"{type(e).__name__}: {e}"})
            return
        try:
            result = {"status": "ran", "detail": detail, **_read(t, stats_run, tokenizer_dir)}
        except BaseException as e:
            msg = str(e)
            result = {
                "status": "raised",
                "detail": detail,
                "type": type(e).__name__,
                "message": msg[:500],
                "one_line": "\n" not in msg,
                "names_file": str(d) in msg,
                "clean_type": _clean_type(e),
                "traceback": traceback.format_exc(limit=-4)[-2000:],
            }
    conn.send(result)


def _clean_type(e: BaseException) -> bool:
    from mm1.data.sources import DataError

    return isinstance(e, (DataError, FileNotFoundError, ValueError)) and not isinstance(
        e, UnicodeError
    )


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def logging_off() -> None:
    import logging

    logging.getLogger("mm1").setLevel(logging.CRITICAL)


def run_case(case: Case, case_seed: int, stats_run: bool, tokenizer_dir: str) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, case, case_seed, stats_run, tokenizer_dir))
    t0 = time.perf_counter()
    p.start()
    child.close()
    res: dict[str, Any] | None = None
    if parent.poll(TIME_LIMIT_S):
        try:
            res = parent.recv()
        except EOFError:
            res = None
    p.join(2.0)
    if p.is_alive():
        p.kill()
        p.join()
    elapsed = time.perf_counter() - t0
    if res is None:
        if elapsed >= TIME_LIMIT_S:
            res = {"status": "hang", "detail": f"no result in {TIME_LIMIT_S:.0f} s"}
        else:
            res = {"status": "died", "detail": f"child exit code {p.exitcode} (memory?)"}
    res["seconds"] = round(elapsed, 2)
    res.update({"case": case.name, "input": case.input, "seed": case_seed})
    res["result"], res["summary"] = classify(res)
    return res


def classify(res: dict[str, Any]) -> tuple[str, str]:
    status = res["status"]
    if status == "harness error":
        return "skipped", f"harness could not build the case ({res['detail']})"
    if status in ("hang", "died"):
        return "CRASH", res["detail"]
    ds = res.get("data_stats")
    ds_note = ""
    if ds is not None:
        ds_note = (
            f"; data stats: {ds['error'][:80]}"
            if "error" in ds
            else f"; data stats: {ds['records']} read"
        )
    if status == "raised":
        msg = " ".join(res["message"].split())[:140]
        if res["clean_type"] and res["one_line"] and res["names_file"]:
            return "clean error", f"{res['type']}: {_short(msg)}"
        return "CRASH", f"{res['type']}: {_short(msg)}"
    if res["bad_output"]:
        return "CRASH", f"bad record yielded: {res['bad_output']}"
    read = res["read"]
    parts = [f"{read['records']} read"]
    if read["skipped"]:
        parts.append("skipped " + ", ".join(f"{k}={v}" for k, v in read["skipped"].items()))
    if read["repaired"]:
        parts.append("repaired " + ", ".join(f"{k}={v}" for k, v in read["repaired"].items()))
    if read["oversize_images"]:
        parts.append(f"oversize={read['oversize_images']}")
    return "ok", "; ".join(parts) + ds_note


def _short(msg: str) -> str:
    """A message with the temporary directory left out."""
    import re

    return re.sub(r"/tmp/[^ :'\"]*?/(?=[^/ ]*)", "", msg)


def make_tokenizer(d: Path) -> str:
    from mm1.data.synthetic import train_world_tokenizer

    tok = train_world_tokenizer(
        [f"caption {i} document text sentence what is it" for i in range(50)], 300
    )
    tok.save(str(d / "tokenizer.json"))
    return str(d / "tokenizer.json")


def all_cases(n_random: int, seed: int) -> list[tuple[Case, int]]:
    return [(c, seed) for c in _named_cases()] + _random_cases(n_random, seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", type=int, default=200, help="random cases on top of the named ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/fuzz_readers.json")
    ap.add_argument(
        "--stats-every",
        type=int,
        default=8,
        help="also run data stats on every k-th case (0: named ones only, -1: none)",
    )
    ap.add_argument("--only", default="", help="run only cases whose name or input contains this")
    ap.add_argument(
        "--named",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the named cases",
    )
    args = ap.parse_args(argv)

    cases = all_cases(args.cases, args.seed)
    if not args.named:
        cases = cases[len(_named_cases()) :]
    if args.only:
        cases = [(c, s) for c, s in cases if args.only in c.name or args.only in c.input]
    # import what the children use once, so each fork starts warm
    import mm1.data.loader
    import mm1.data.sources  # noqa: F401

    runs_stats = [
        (args.stats_every >= 0 and c.stats) or (args.stats_every > 0 and i % args.stats_every == 0)
        for i, (c, _) in enumerate(cases)
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(Path(tmp)) if any(runs_stats) else ""
        for i, (case, case_seed) in enumerate(cases):
            stats_run = runs_stats[i] and args.stats_every >= 0
            res = run_case(case, case_seed, stats_run, tok)
            results.append(res)
            mark = "!!" if res["result"] == "CRASH" else "  "
            print(
                f"{mark} [{i + 1}/{len(cases)}] {case.input:14} {case.name[:50]:50} {res['result']:11} {res['summary'][:110]}",
                flush=True,
            )
    counts: dict[str, int] = {}
    for r in results:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    summary = {"seed": args.seed, "random_cases": args.cases, "counts": counts, "cases": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"results in {out}")
    return 1 if counts.get("CRASH") else 0


if __name__ == "__main__":
    sys.exit(main())
