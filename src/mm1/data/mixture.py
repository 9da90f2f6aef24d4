"""Sources and the weighted mixture: which record comes next, and where every reader stands.

Each (rank, loader worker) pair is a "slot" with its own cursors. A source's shards are dealt
out to the slots (shard-level when there are at least as many shards as slots, else contiguous
record ranges of every shard), so slots read disjoint records. Within a slot, an epoch of a
source is one pass over its share, in a shard order reshuffled every epoch. The mixture draws
the source of every next document by weight from a seeded generator whose state is saved.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mm1.config import SourceConfig
from mm1.data.catalog import count_records, list_shards
from mm1.data.document import Conversation, Document
from mm1.data.sources import READERS, DataError, ReadStats, check_error_rate
from mm1.data.sources.base import MIN_SEEN_RECORDS

Record = Document | Conversation
logger = logging.getLogger(__name__)

# The keyword under which each reader takes its local image folder.
# The reader argument `image_root` goes to, where the reader names it otherwise.
IMAGE_ROOT_ARG = {"mmc4": "image_dir", "llava": "image_folder", "llava_yaml": "image_folder"}


@dataclass
class Cursor:
    """Where a slot stands in one source: epoch, position in the epoch's shard order, and the
    number of records of the current shard (or range) already taken."""

    epoch: int = 0
    shard_pos: int = 0
    record: int = 0


class SourceStream:
    """One source as seen by one slot: yields (shard index, record index, record)."""

    def __init__(
        self,
        index: int,
        spec: SourceConfig,
        slot: int,
        num_slots: int,
        seed: int,
        max_error_rate: float = 1.0,
        resume_changed: bool = False,
    ) -> None:
        self.index, self.spec = index, spec
        self.max_error_rate = max_error_rate
        self.resume_changed = resume_changed
        self.changed = False  # set when a loaded state's files differ (and resume_changed)
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        self.shards = list_shards(spec.path, spec.format)
        self.files = files_fingerprint(self.shards)
        self.cursor = Cursor()
        self.stats = ReadStats()
        # The epoch of the last record the pipeline used (see `reject`). Counted from 0 even
        # before one is used: a slot's share of a sharded source changes with each epoch's
        # shuffle, so epoch 0's share may be all bad shards while epoch 1's is not.
        self._used_epoch = 0
        self._iter: Iterator[tuple[int, Record]] | None = None
        self._ranges: dict[int, tuple[int, int]] = {}

    # -- layout -------------------------------------------------------------------------------

    @property
    def shard_level(self) -> bool:
        return len(self.shards) >= self.num_slots

    def epoch_order(self, epoch: int) -> list[int]:
        """Shard indices this slot reads in `epoch` (the same permutation for every slot)."""
        perm = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(self.shards))
        if self.shard_level:
            return [int(i) for i in perm[self.slot :: self.num_slots]]
        return [int(i) for i in perm]

    def record_range(self, shard: int) -> tuple[int, int]:
        """[first, end) records of `shard` that belong to this slot."""
        if self.shard_level:
            return (0, -1)  # the whole shard
        if shard not in self._ranges:
            n = count_records(self.shards[shard], self.spec.format)
            lo, hi = n * self.slot // self.num_slots, n * (self.slot + 1) // self.num_slots
            self._ranges[shard] = (lo, hi)
        return self._ranges[shard]

    # -- reading ------------------------------------------------------------------------------

    def _open(self, shard: int, start: int) -> Iterator[tuple[int, Record]]:
        """Records of a shard from raw index `start`, with their raw indices."""
        fmt, root = self.spec.format, self.spec.image_root
        kind = self.spec.resolved_kind
        kwargs: dict[str, Any] = {"start": start, "stats": self.stats, "kind": kind}
        if root is not None:
            kwargs[IMAGE_ROOT_ARG.get(fmt, "image_root")] = Path(root)
        if self.spec.allow_absolute_paths:
            kwargs["allow_absolute_paths"] = True
        for record in READERS[fmt](self.shards[shard], **kwargs):
            yield int(record.meta["__index__"]), record

    def next(self) -> tuple[int, int, Record]:
        """The next record of this slot's share; rolls over to a reshuffled epoch at the end."""
        empty_passes = 0
        while True:
            order = self.epoch_order(self.cursor.epoch)
            if self.cursor.shard_pos >= len(order):
                if empty_passes:
                    reasons = ", ".join(sorted(k for k, v in self.stats.skipped.items() if v))
                    why = (
                        f": every record was skipped ({reasons}; see the warnings)"
                        if reasons
                        else ""
                    )
                    share = (
                        f" in the share of loader slot {self.slot} of {self.num_slots}"
                        if self.num_slots > 1
                        else ""
                    )
                    raise DataError(
                        f"data source {self.spec.path} ({self.spec.format}) yields no readable "
                        f"records{share}{why}"
                    )
                empty_passes += 1
                self.cursor = Cursor(epoch=self.cursor.epoch + 1)
                self._iter = None
                continue
            shard = order[self.cursor.shard_pos]
            lo, hi = self.record_range(shard)
            if self._iter is None:
                self._iter = self._open(shard, lo + self.cursor.record)
            item = next(self._iter, None)
            if item is None or (hi >= 0 and item[0] >= hi):
                check_error_rate(
                    self.stats, self.max_error_rate, self.spec.path, min_seen=MIN_SEEN_RECORDS
                )
                self.cursor.shard_pos += 1
                self.cursor.record = 0
                self._iter = None
                continue
            raw, record = item
            self.cursor.record = raw + 1 - lo
            empty_passes = 0
            check_error_rate(
                self.stats, self.max_error_rate, self.spec.path, min_seen=MIN_SEEN_RECORDS
            )
            return shard, raw, record

    def used(self) -> None:
        """The pipeline used the record `next` gave last."""
        self._used_epoch = self.cursor.epoch

    def reject(self, reason: str) -> None:
        """The pipeline could not use the record `next` gave last (untokenizable, empty): it
        counts as skipped instead of read, so the error rate sees it once. A whole pass over
        this slot's share with no record used is a `DataError`: the loader would otherwise
        read it forever, whatever `data.max_error_rate` allows."""
        self.stats.records -= 1
        self.stats.skip(reason)
        if self.cursor.epoch >= self._used_epoch + 2:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.stats.skipped.items()))
            raise DataError(
                f"data source {self.spec.path}: a whole pass over its records gave no usable "
                f"document ({self.stats.num_skipped} skipped: {reasons})"
            )

    def read_at(self, shard: int, record: int) -> Record:
        """Re-read one record (to rebuild the packing buffer after a resume)."""
        item = next(self._open(shard, record), None)
        if item is None or item[0] != record:
            raise DataError(
                f"cannot re-read record {record} of {self.shards[shard]}: the source changed "
                "since the checkpoint"
            )
        return item[1]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": asdict(self.cursor), "stats": self.stats.to_dict(), "files": self.files}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = Cursor(**state["cursor"])
        self.stats = ReadStats.from_dict(state["stats"])
        self._used_epoch = self.cursor.epoch
        self._iter = None
        saved = state.get("files")  # absent from checkpoints before 2026-12-06
        if saved is None or saved == self.files:
            return
        # The cursor indexes the saved file list: in another list it would re-read some records
        # and skip others, silently.
        then, now = saved["count"], self.files["count"]
        what = f"{then} file(s) then, {now} now" if then != now else "their names or sizes differ"
        if not self.resume_changed:
            raise DataError(
                f"data source {self.spec.path} changed since the checkpoint ({what}): the saved "
                "position would re-read some records and skip others. Restore its files, or "
                "resume with --force to start its next epoch over the files as they are now"
            )
        logger.warning(
            "data source %s changed since the checkpoint (%s): starting its next epoch",
            self.spec.path,
            what,
        )
        self.cursor = Cursor(epoch=self.cursor.epoch + 1)
        self.changed = True


def files_fingerprint(shards: list[Path]) -> dict[str, Any]:
    """What identifies a source's files: their count, and a digest of their names (relative to
    their common folder, so the data may move) and sizes."""
    base = os.path.commonpath([str(p.parent) for p in shards])
    digest = hashlib.sha256()
    for p in shards:
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        digest.update(f"{os.path.relpath(p, base)}\t{size}\n".encode())
    return {"count": len(shards), "digest": digest.hexdigest()[:16]}


class Mixture:
    """Draws the source of each next document by weight; the generator state is saved."""

    def __init__(self, streams: list[SourceStream], seed: int, slot: int) -> None:
        weights = np.array([s.spec.weight for s in streams], dtype=np.float64)
        if weights.sum() <= 0:
            raise ValueError("the mixture weights sum to zero")
        self.streams = streams
        self.probs = weights / weights.sum()
        self.rng = np.random.default_rng([seed, slot, 0x5EED])

    def next(self) -> tuple[tuple[int, int, int], Record]:
        i = int(self.rng.choice(len(self.streams), p=self.probs))
        shard, raw, record = self.streams[i].next()
        return (i, shard, raw), record

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "sources": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        for s, st in zip(self.streams, state["sources"], strict=True):
            s.load_state_dict(st)
