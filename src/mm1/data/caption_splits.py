"""Clean-caption splits of the synthetic world's alt-text source, for the re-captioning study.

The world's `captions/` shards carry noisy web alt-text as their caption, and each record's
json also holds the scene's clean detailed caption (`recaption`). This writes, as new files
beside the world (its own files stay byte-identical):

    captions_clean_subset/00000.tar …   a small fraction of the alt-text images with their clean
                                        captions: what a human-annotated set would be, to train
                                        the re-captioner on
    captions_clean/00000.tar …          every alt-text image with its clean caption: the ceiling
                                        re-captioning can reach
    caption_splits.json                 what was written (fraction, seed, counts, shards)

Which records join the subset is a hash of (seed, key): its own stream, independent of the
world's generators, and the same for the same arguments.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm1.data.sources.wds import split_key
from mm1.data.synthetic import WorldManifest
from mm1.data.synthetic_writers import dumps, write_tar

CLEAN_ALL = "captions_clean"
CLEAN_SUBSET = "captions_clean_subset"
SPLITS_FILE = "caption_splits.json"
SUBSET_PER_SHARD = 1000


def tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a WebDataset shard, in order."""
    with tarfile.open(shard, "r:*") as tf:
        key: str | None = None
        group: dict[str, bytes] = {}
        for member in tf:
            if not member.isfile():
                continue
            k, ext = split_key(member.name)
            if k != key and key is not None:
                yield key, group
                group = {}
            key = k
            f = tf.extractfile(member)
            group[ext] = f.read() if f is not None else b""
        if key is not None:
            yield key, group


def in_subset(key: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"caption-subset:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _clean_members(key: str, group: dict[str, bytes]) -> list[tuple[str, bytes]]:
    meta = json.loads(group["json"])
    clean = meta["recaption"]
    meta = {**meta, "caption": clean, "caption_style": "clean"}
    image_ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in group)
    return [
        (f"{key}.{image_ext}", group[image_ext]),
        (f"{key}.txt", clean.encode()),
        (f"{key}.json", dumps(meta).encode()),
    ]


def write_caption_splits(
    world: str | Path, fraction: float = 0.05, seed: int = 0
) -> dict[str, Any]:
    """Write the clean subset and the all-clean copy of the world's alt-text captions (see the
    module); nothing is rewritten when the same splits are there already."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction}: give a share between 0 and 1, e.g. 0.05")
    manifest = WorldManifest.load(world)
    root = manifest.root
    record_path = root / SPLITS_FILE
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("fraction") == fraction and old.get("seed") == seed:
            return old
    for name in (CLEAN_ALL, CLEAN_SUBSET):
        (root / name).mkdir(exist_ok=True)
    subset: list[tuple[str, bytes]] = []
    subset_shards: list[str] = []
    all_shards: list[str] = []
    total = chosen = 0

    def flush_subset() -> None:
        name = f"{CLEAN_SUBSET}/{len(subset_shards):05d}.tar"
        write_tar(root / name, subset)
        subset_shards.append(name)
        subset.clear()

    for shard in manifest.shards("captions"):
        members: list[tuple[str, bytes]] = []
        for key, group in tar_samples(shard):
            clean = _clean_members(key, group)
            members += clean
            total += 1
            if in_subset(key, fraction, seed):
                subset += clean
                chosen += 1
                if len(subset) >= 3 * SUBSET_PER_SHARD:
                    flush_subset()
        name = f"{CLEAN_ALL}/{shard.name}"
        write_tar(root / name, members)
        all_shards.append(name)
    if subset or not subset_shards:
        flush_subset()
    record = {
        "fraction": fraction,
        "seed": seed,
        "from": "captions",
        CLEAN_SUBSET: {"records": chosen, "shards": subset_shards},
        CLEAN_ALL: {"records": total, "shards": all_shards},
    }
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
