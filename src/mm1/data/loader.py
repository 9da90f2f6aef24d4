"""The training loader: mixture -> tokenize -> pack -> preprocess -> Batch, resumable exactly.

`PackedDataset` runs the whole pipeline for one (rank, worker) slot; torchdata's
`StatefulDataLoader` runs it in worker processes and snapshots each worker's state after every
batch it hands out, so a checkpoint records exactly what was consumed. On resume every slot
restores its cursors and generator, and rebuilds its packing buffer by re-reading the few
buffered records (nothing already emitted is read again).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from mm1.batch import Batch
from mm1.config import SOURCE_KINDS, DataConfig, SourceConfig
from mm1.data.document import Conversation, caption_first
from mm1.data.images import ImageProcessor
from mm1.data.mixture import Record, SourceStream
from mm1.data.packing import (
    Packer,
    PackStats,
    Piece,
    UnfitDocument,
    collate,
    slice_document,
    split_document,
)
from mm1.data.prompt_format import PromptFormat
from mm1.data.sharded import ShardedDataset, WorkerError, check_saved_sources, slot_states
from mm1.data.sources import DataError, ReadStats, check_error_rate, warn_skip
from mm1.data.sources.base import MIN_SEEN_RECORDS
from mm1.data.sources.decode import DEFAULT_MAX_IMAGE_PIXELS
from mm1.data.tokenizer import (
    TokenizedDocument,
    Tokenizer,
    tokenize_conversation,
    tokenize_document,
)

# torchdata's StatefulDataLoader calls an API torch has deprecated; the warning is not ours.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


@dataclass
class LoaderSettings:
    sources: list[SourceConfig]
    seq_len: int
    micro_batch_size: int
    # Image slots, boundaries and the chat template (None: the tokenizer's, where
    # `data.chat_template` is set, else plain): how records become tokens.
    prompt_format: PromptFormat
    max_images_per_seq: int = 16
    pack_buffer: int = 32
    max_error_rate: float = 0.01
    seed: int = 0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_text_chars: int = DataConfig.max_text_chars
    resume_changed_sources: bool = False  # `mm1 train --force`
    caption_first: float = 0.0  # `data.caption_first`

    @classmethod
    def from_config(
        cls,
        data: DataConfig,
        sources: list[SourceConfig],
        prompt_format: PromptFormat,
        micro_batch_size: int = 1,
    ) -> LoaderSettings:
        return cls(
            sources=list(sources),
            seq_len=data.seq_len,
            micro_batch_size=micro_batch_size,
            prompt_format=prompt_format,
            max_images_per_seq=data.max_images_per_seq,
            pack_buffer=data.pack_buffer,
            max_error_rate=data.max_error_rate,
            seed=data.seed,
            max_image_pixels=data.max_image_pixels,
            max_text_chars=data.max_text_chars,
            caption_first=data.caption_first,
        )


class PackedDataset(ShardedDataset):
    """Endless packed batches for one rank; each loader worker is its own slot."""

    s: LoaderSettings

    def __init__(
        self,
        settings: LoaderSettings,
        tokenizer: Tokenizer,
        processor: ImageProcessor,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(settings, tokenizer, processor, rank, world_size, num_workers)
        self._packer: Packer | None = None
        self.kind_index = {kind: i for i, kind in enumerate(SOURCE_KINDS)}

    # -- per-slot pipeline ---------------------------------------------------------------------

    def _build(self) -> None:
        self._open_mixture()
        self._packer = Packer(self.s.seq_len, self.s.max_images_per_seq, self.s.pack_buffer)
        if self._state is not None:
            self._restore_buffer(self._state)

    def tokenize(self, record: Record) -> TokenizedDocument:
        if isinstance(record, Conversation):
            return tokenize_conversation(record, self.tok, self.s.prompt_format)
        record = caption_first(record, self.s.caption_first, self.s.seed)
        return tokenize_document(record, self.tok, self.s.prompt_format)

    def _fill(self) -> None:
        assert self._mixture is not None and self._packer is not None
        while self._packer.wants_more():
            ref, record = self._mixture.next()
            stream = self._mixture.streams[ref[0]]
            if self._too_much_text(record, stream):
                continue
            try:
                doc = self.tokenize(record)
            except ValueError as err:  # e.g. an image-tag count that does not match
                warn_skip("untokenizable", record.id, str(err))
                stream.reject("untokenizable")
                continue
            if len(doc.input_ids) < 2:
                stream.reject("empty_document")
                continue
            try:
                self._packer.add(doc, ref)
            except UnfitDocument as err:  # e.g. a conversation's answer past data.seq_len
                warn_skip(err.reason, record.id, str(err))
                stream.reject(err.reason)
                continue
            stream.used()
        self._check_errors()

    def _check_errors(self) -> None:
        assert self._mixture is not None
        for stream in self._mixture.streams:
            check_error_rate(
                stream.stats, self.s.max_error_rate, stream.spec.path, min_seen=MIN_SEEN_RECORDS
            )

    def _batches(self) -> Iterator[Batch]:
        self._build()
        assert self._packer is not None
        while True:
            sequences: list[list[Piece]] = []
            for _ in range(self.s.micro_batch_size):
                self._fill()
                sequences.append(self._packer.next_sequence())
            images = [im for seq in sequences for p in seq for im in p.doc.images]
            fmt = self.s.prompt_format
            pixels = crops = sizes = None
            if images:
                pixels = fmt.pixel_values(self.processor, images)
                crops, sizes = fmt.image_info(images)
            yield collate(
                sequences, self.s.seq_len, self.tok.pad_id, self.kind_index, pixels, crops, sizes
            )

    # -- state -----------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        assert self._packer is not None
        return {
            "buffer": [list(p.ref) for p in self._packer.buffer],
            "pack_stats": self._packer.stats.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._packer = None

    def _restore_buffer(self, state: dict[str, Any]) -> None:
        """The packer as it was: its stats, and its buffered pieces re-read from their records."""
        assert self._mixture is not None and self._packer is not None
        self._packer.stats = PackStats.from_dict(state["pack_stats"])
        cache: dict[tuple[int, int, int], list[TokenizedDocument]] = {}
        for src, shard, record, piece, used in state["buffer"]:
            if self._mixture.streams[src].changed:  # its saved indices mean other records now
                continue
            key = (src, shard, record)
            if key not in cache:
                doc = self.tokenize(_reread(self._mixture.streams[src], shard, record))
                cache[key] = split_document(doc, self.s.seq_len, self.s.max_images_per_seq)[0]
            p = cache[key][piece]
            if used:
                p = slice_document(p, used, len(p.input_ids))
            self._packer.restore(
                Piece(p, (src, shard, record, piece, used), first=not used and piece == 0)
            )


def _reread(stream: SourceStream, shard: int, record: int) -> Record:
    """Re-read a buffered record into a throwaway `ReadStats`: the restored stats already count
    it from when it was first read, so counting the re-read would inflate them."""
    live, stream.stats = stream.stats, ReadStats()
    try:
        return stream.read_at(shard, record)
    finally:
        stream.stats = live


class Loader(StatefulDataLoader):
    """`StatefulDataLoader` that raises a worker's `sharded.ONE_LINE_ERRORS` in the main
    process as the same exception (type and message) the single-process loader raises."""

    def __iter__(self) -> Iterator[Batch]:
        batches = super().__iter__()
        _WORKERS.update(dict.fromkeys(getattr(batches, "_workers", ()), os.getpid()))
        _hold_queues(batches)
        return _raising(batches)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if isinstance(self.dataset, ShardedDataset):  # before any worker starts reading
            check_saved_sources(state_dict, self.dataset.s)
        super().load_state_dict(state_dict)

    def close(self) -> None:
        """Stop the worker processes now. Persistent workers otherwise live as long as the
        loader, and an interpreter that exits with them alive waits for them forever: they
        ignore the SIGTERM it sends (`leave_stop_signals_to_the_trainer`)."""
        it = self._iterator
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._iterator = None


# Every loader's worker processes, with the pid of the process that started them. They ignore
# SIGTERM, which is how multiprocessing stops daemonic children at exit (and how torch stops a
# worker that does not leave in time): an interpreter exiting with one still alive (a loader not
# closed, or one whose worker did not take its shutdown) would wait for it forever. This
# handler, registered after multiprocessing's (atexit runs the last registered first), kills
# them before.
_WORKERS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


@atexit.register
def _kill_workers_left() -> None:
    me = os.getpid()
    workers = [w for w, parent in list(_WORKERS.items()) if parent == me and w.is_alive()]
    if not workers:
        return
    # torch's SIGCHLD handler raises for a killed worker still registered with it, which would
    # end this handler at the first kill and leave the others alive.
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for w in workers:
        with contextlib.suppress(OSError):
            w.kill()
    for w in workers:
        with contextlib.suppress(Exception):
            w.join(timeout=5)


# The queues of every live multi-process iterator, held from here until it is gone. A loader
# left in a reference cycle (a failed one whose exception is kept, say) is freed by the cycle
# collector, which calls weakref callbacks before `__del__` methods: the queues' own finalizers
# would stop their feeder threads first, the iterator's shutdown messages would never reach the
# workers, and torch would wait 5 s and then SIGTERM workers that ignore it. Held here, the
# queues are not part of the garbage; a finalizer lets go of them once the iterator is freed.
_QUEUES: dict[int, tuple[Any, ...]] = {}


def _hold_queues(batches: Iterator[Any]) -> None:
    key = id(batches)
    queues = getattr(batches, "_index_queues", None)
    if key in _QUEUES or queues is None:  # a persistent iterator reset, or no workers
        return
    _QUEUES[key] = (*queues, getattr(batches, "_worker_result_queue", None))
    weakref.finalize(batches, _QUEUES.pop, key, None)


def _raising(batches: Iterator[Any]) -> Iterator[Batch]:
    for batch in batches:
        if isinstance(batch, WorkerError):
            raise batch.error
        yield batch


def build_loader(
    settings: LoaderSettings,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Loader:
    dataset = PackedDataset(settings, tokenizer, processor, rank, world_size, num_workers)
    return loader_of(dataset, num_workers)


def loader_of(dataset: torch.utils.data.IterableDataset, num_workers: int) -> Loader:
    """The DataLoader over a dataset that yields whole batches, with `num_workers` workers."""
    return Loader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=leave_stop_signals_to_the_trainer,
    )


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A data worker ignores SIGTERM and SIGINT. torchrun, schedulers and Ctrl-C signal the
    whole process group; a worker killed by them would fail the step before the trainer could
    save. The trainer stops at the step's end, and its workers are shut down with the loader."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_counts(state: dict[str, Any]) -> dict[str, int]:
    """Skipped records (in all, and `skipped_<reason>` for each reason seen), dropped images and
    truncated documents, summed over the `PackedDataset` states in a loader state (one per
    worker snapshot, or the single-process loader's one)."""
    reasons: Counter[str] = Counter()
    dropped = truncated = 0
    for slot in slot_states(state):
        if "pack_stats" in slot:
            for s in slot["mixture"]["sources"]:
                reasons.update(s["stats"]["skipped"])
            dropped += slot["pack_stats"]["images_dropped"]
            truncated += slot["pack_stats"].get("truncated", 0)
    return {
        "skipped_records": sum(reasons.values()),
        "images_dropped": dropped,
        "truncated_documents": truncated,
        **{f"skipped_{reason}": n for reason, n in sorted(reasons.items()) if n},
    }


def packing_stats(
    settings: LoaderSettings,
    tokenizer: Tokenizer,
    num_sequences: int,
    progress: bool = False,
    read_past_error_rate: bool = False,
) -> dict[str, Any]:
    """Mixture, packing and reading statistics of the first `num_sequences` sequences of one
    slot (images are read but not preprocessed).

    A source with more bad records than `max_error_rate` stops it with training's `DataError`,
    unless `read_past_error_rate` (`mm1 data stats`: the statistics are what one reads to see
    why a source is bad); `error_rate_exceeded` then lists that error's message for each such
    source."""
    from rich.progress import track

    limit = settings.max_error_rate
    settings = replace(
        settings, micro_batch_size=1, max_error_rate=1.0 if read_past_error_rate else limit
    )
    ds = PackedDataset(settings, tokenizer, processor=None)  # type: ignore[arg-type]
    ds._build()
    assert ds._packer is not None and ds._mixture is not None
    steps = range(num_sequences)
    for _ in track(steps, description="packing", disable=not progress):
        ds._fill()
        ds._packer.next_sequence()
    out = ds._packer.stats.to_dict()
    out["read"] = ds.read_stats().to_dict()
    out["error_rate_exceeded"] = []
    for stream in ds._mixture.streams:
        try:
            check_error_rate(stream.stats, limit, stream.spec.path, min_seen=MIN_SEEN_RECORDS)
        except DataError as err:
            out["error_rate_exceeded"].append(str(err))
    out["seq_len"] = settings.seq_len
    out["num_image_tokens"] = settings.prompt_format.image_tokens
    total = sum(s.weight for s in settings.sources) or 1.0
    weights: dict[str, float] = {}
    for s in settings.sources:
        weights[s.resolved_kind] = weights.get(s.resolved_kind, 0.0) + s.weight / total
    out["target_mixture"] = weights
    return out
