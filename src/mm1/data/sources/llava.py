"""SFT conversations: LLaVA JSON / JSONL and LLaVA-NeXT's YAML list of datasets."""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mm1.data.document import ROLES, Conversation
from mm1.data.sources.base import (
    IMAGE_TAG,
    BadImage,
    DataError,
    ReadStats,
    count_images,
    default_image_dir,
    image_from_path,
    json_line_limit,
    json_list_once,
    load_json_file_once,
    open_text,
    repair_record,
    resolve_image_path,
    skip_record,
    too_deep,
)
from mm1.data.sources.json_list import JsonList, NotAList
from mm1.data.sources.jsonl import bounded_lines, jsonl_records


def _llava_records(
    path: Path, stats: ReadStats, start: int = 0, only: list[int] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, record) from `start` on, or for the sorted record indices `only`; bad records
    before `start` were counted when first read and are not counted again on a resume. A plain
    .json list is indexed once per process and only the records asked for are parsed
    (`JsonList`); a gzipped one is parsed whole, and a JSONL file is read through from the
    first index asked for (bad records on the way are counted, as a full read counts them)."""
    name = path.name.lower()
    if only is not None:
        if not only:
            return
        start = only[0]
    if name.endswith((".jsonl", ".jsonl.gz")):
        lines = jsonl_records(path, start, stats)
        yield from lines if only is None else _picked(lines, only)
        return
    if name.endswith(".gz"):
        items: Iterable[tuple[int, Any, bool]] = _parsed_list(path, start)
        items = items if only is None else _picked(items, only)
    else:
        index = _json_list(path)
        items = index.records_at(range(start, len(index)) if only is None else only)
    for i, rec, invalid_bytes in items:
        where = f"{path}: record {i}"
        if not isinstance(rec, dict) or too_deep(rec):
            skip_record(stats, "malformed_record", where, "not a JSON object of sane depth")
            continue
        yield i, repair_record(stats, rec, where, invalid_bytes)


def _picked(items: Iterable[tuple[Any, ...]], only: list[int]) -> Iterator[Any]:
    """The items (index first) whose index is in the sorted `only`, stopping after the last."""
    wanted = set(only)
    for item in items:
        if item[0] > only[-1]:
            return
        if item[0] in wanted:
            yield item


def _json_list(path: Path) -> JsonList:
    try:
        return json_list_once(path)
    except NotAList:
        raise DataError(f"{path}: LLaVA data must be a JSON list") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); LLaVA data is a JSON list") from None


def _parsed_list(path: Path, start: int) -> Iterator[tuple[int, Any, bool]]:
    try:
        data, invalid_bytes = load_json_file_once(path)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); LLaVA data is a JSON list") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: LLaVA data must be a JSON list, got {type(data).__name__}")
    for index in range(start, len(data)):
        yield index, data[index], invalid_bytes


def count_llava_records(path: Path) -> int:
    """Records of a LLaVA file: a JSON list's elements, a JSONL file's non-blank lines."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        with open_text(path) as f:  # a line over the bound counts, unkept (`jsonl_records`)
            lines = bounded_lines(f, json_line_limit())
            return sum(1 for line in lines if line is None or line.strip())
    if name.endswith(".gz"):
        data, _ = load_json_file_once(path)
        return len(data) if isinstance(data, list) else 0
    return len(_json_list(path))


def _llava_conversation(
    rec: dict[str, Any],
    index: int,
    path: Path,
    image_folder: Path,
    stats: ReadStats,
    kind: str,
    allow_outside: bool = False,
) -> Conversation | None:
    where = f"{path}: record {index}"
    turns = rec.get("conversations")
    if turns is not None and not isinstance(turns, list):
        what = type(turns).__name__
        skip_record(stats, "malformed_record", where, f"`conversations` is a {what}, not a list")
        return None
    if not turns:
        skip_record(stats, "empty_document", where, "no conversations")
        return None
    messages: list[dict[str, str]] = []
    for turn in turns:
        role = value = None
        if isinstance(turn, dict):
            role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            skip_record(stats, "malformed_record", where, f"bad turn {turn!r:.200}")
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
        skip_record(stats, "malformed_record", where, "`image` must be a path or a list of paths")
        return None
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if len(files) == 1 and n_tags == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            skip_record(stats, "image_count_mismatch", where, "one image but no user turn")
            return None
        first_user["content"] = f"{IMAGE_TAG}\n{first_user['content']}"
    elif n_tags != len(files):
        skip_record(
            stats,
            "image_count_mismatch",
            where,
            f"{n_tags} {IMAGE_TAG} tag(s) for {len(files)} image(s)",
        )
        return None
    images = []
    for name in files:
        try:
            images.append(image_from_path(resolve_image_path(image_folder, name, allow_outside)))
        except BadImage as e:
            skip_record(stats, e.reason, where, e.detail)
            return None
    meta = {k: v for k, v in rec.items() if k != "conversations"}
    meta.update({"__shard__": str(path), "__index__": index})
    stats.records += 1
    count_images(stats, images)
    conv_id = rec.get("id")
    return Conversation(
        id=str(conv_id) if conv_id is not None else f"{path.name}:{index}",
        images=images,
        messages=messages,
        kind=kind,
        meta=meta,
    )


def read_llava(
    path: str | Path,
    image_folder: str | Path | None = None,
    stats: ReadStats | None = None,
    *,
    start: int = 0,
    kind: str = "sft",
    allow_absolute_paths: bool = False,
) -> Iterator[Conversation]:
    """Read LLaVA SFT data: a JSON list (.json) or one record per line (.jsonl).

    Record: {id, image (a path relative to `image_folder`, a list of paths for multi-image, or
    absent for text-only), conversations: [{from: human|gpt|system, value}]}. Roles map to
    user/assistant/system. Each `<image>` tag marks where the next image goes, and the number of
    tags must equal the number of images — except one image with no tag, where `<image>\\n` is
    prepended to the first user turn as LLaVA does; any other mismatch is a bad record
    (`image_count_mismatch`). `image_folder` defaults to the file's `images/` subfolder if it
    exists, else its directory. An image path that is absolute or climbs out of the folder
    with `..` is a bad record (`absolute_path`, `path_outside_root`) unless
    `allow_absolute_paths`. A whole .json file that is not valid JSON raises `DataError`.
    """
    path = Path(path)
    stats = ReadStats() if stats is None else stats
    folder = Path(image_folder) if image_folder is not None else default_image_dir(path)
    for index, rec in _llava_records(path, stats, start):
        conv = _llava_conversation(rec, index, path, folder, stats, kind, allow_absolute_paths)
        if conv is not None:
            yield conv


def sample_indices(n: int, strategy: str, rng: random.Random, where: str) -> list[int]:
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
    except (ValueError, OverflowError):  # "x", "nan%", "inf%"
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
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{yaml_path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise DataError(f"{yaml_path}: not valid YAML: nested too deeply") from None
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
        if folder is not None and not isinstance(folder, (str, Path)):
            raise DataError(
                f"{yaml_path}: dataset {i}: `image_folder` must be a path, got "
                f"{type(folder).__name__}"
            )
        if folder is None:
            folder_path = default_image_dir(json_path)
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
    kind: str = "sft",
    allow_absolute_paths: bool = False,
) -> Iterator[Conversation]:
    """Read every dataset of a LLaVA-NeXT data YAML, applying its `sampling_strategy`.

        datasets:
          - json_path: llava_v1_5_mix665k.json
            sampling_strategy: first:10%     # all | first:N | end:N | random:N  (N or N%)
            image_folder: images             # optional (mm1 extension)

    `random:` is deterministic for a given `seed` (LLaVA-NeXT shuffles with the global RNG); the
    chosen records keep their file order. Records are selected among all of the file's records (a
    JSON list's elements, a JSONL file's non-blank lines: what LLaVA-NeXT loads), then read and
    converted (bad ones skipped and counted); a plain JSON list reads only the chosen ones.
    Each conversation's meta gets `dataset` (the json path as written in the YAML) and
    `__record__` (its index in that file); `__index__` is its position in the sequence of all
    selected records of the YAML, which is what `start` skips (without loading images) and what
    `count_records(yaml, "llava_yaml")` counts.
    """
    stats = ReadStats() if stats is None else stats
    position = 0  # records selected from the datasets before this one
    for i, ds in enumerate(llava_yaml_datasets(yaml_path, image_folder)):
        path = ds["json_path"]
        rng = random.Random(f"{seed}/{i}/{ds['json_path_as_written']}")
        where = f"{yaml_path}: dataset {ds['json_path_as_written']}"
        chosen = sample_indices(count_llava_records(path), ds["sampling_strategy"], rng, where)
        resumed = min(len(chosen), max(0, start - position))  # chosen before the resume point
        for index, rec in _llava_records(path, stats, only=chosen[resumed:]):
            conv = _llava_conversation(
                rec, index, path, ds["image_folder"], stats, kind, allow_absolute_paths
            )
            if conv is not None:
                conv.meta.update(
                    {
                        "dataset": ds["json_path_as_written"],
                        "__record__": index,
                        "__index__": position + bisect.bisect_left(chosen, index),
                        "__shard__": str(yaml_path),
                    }
                )
                yield conv
        position += len(chosen)
