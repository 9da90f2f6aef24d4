"""Image-caption pairs for encoder pre-training: the same sources, mixture and resumable
cursors as the MM1 loader (`mm1.data.mixture`), each record one (image, caption) pair instead of
packed tokens. A checkpoint stores the mixture's state; nothing is buffered, so a resume
continues at the very next record."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mm1.config import DataConfig, SourceConfig
from mm1.data.document import Conversation, Document
from mm1.data.images import ImageProcessor
from mm1.data.loader import Loader, loader_of
from mm1.data.mixture import Cursor, Mixture
from mm1.data.sharded import ShardedDataset
from mm1.data.sources import DataError
from mm1.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PairBatch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor  # (B, L) captions, EOS-terminated, padded after
    lengths: torch.Tensor  # (B,) tokens of each caption, EOS included

    def to(self, device: torch.device, non_blocking: bool = False) -> PairBatch:
        return PairBatch(
            *(t.to(device, non_blocking=non_blocking) for t in (self.pixel_values, self.input_ids)),
            self.lengths.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def head(self, n: int) -> PairBatch:
        """The first `n` pairs."""
        return PairBatch(self.pixel_values[:n], self.input_ids[:n], self.lengths[:n])


def caption_ids(tok: Tokenizer, text: str, max_len: int) -> list[int]:
    """[BOS] caption EOS, the caption cut so that the whole fits in `max_len` tokens."""
    head = [] if tok.bos_id is None else [tok.bos_id]
    body = tok.encode(text)[: max(0, max_len - len(head) - 1)]
    return [*head, *body, tok.eos_id]


def record_pair(record: Document | Conversation) -> tuple[Any, str]:
    """The first image of a record and its text (a caption pair's caption)."""
    if isinstance(record, Conversation):
        text = " ".join(m["content"].replace("<image>", "") for m in record.messages)
        return (record.images[0] if record.images else None), text.strip()
    images = record.images
    text = " ".join(p for p in record.parts if isinstance(p, str)).strip()
    return (images[0] if images else None), text


@dataclass
class PairSettings:
    sources: list[SourceConfig]
    batch_size: int
    max_len: int
    needs_text: bool  # CLIP: a record without a caption is an error; AIM reads images only
    seed: int = 0
    max_error_rate: float = 0.01
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = DataConfig.max_text_chars
    resume_changed_sources: bool = False  # `mm1 train-encoder --force`
    # Each pair at most once per batch (validation): a source smaller than the batch gives a
    # smaller batch, rather than copies that CLIP's loss would take for negatives.
    distinct: bool = False


class CaptionPairDataset(ShardedDataset):
    """Endless batches of (image, caption) pairs for one rank; each loader worker is a slot."""

    s: PairSettings

    def _next_pair(self, mixture: Mixture) -> tuple[Any, str, tuple[int, int, int]]:
        """The next (image, caption) and where its record is: (source, shard, record)."""
        while True:
            where_read, record = mixture.next()
            src = where_read[0]
            if self._too_much_text(record, mixture.streams[src]):
                continue
            image, text = record_pair(record)
            where = f"data.sources[{src}] ({self.s.sources[src].path}), record {record.id}"
            if self.s.needs_text and not text:
                raise DataError(f"{where}: no caption text; CLIP trains on image-caption pairs")
            if image is None:
                if self.s.needs_text:
                    raise DataError(f"{where}: no image; CLIP trains on image-caption pairs")
                mixture.streams[src].reject("no_image")  # a text-only document (AIM)
                continue
            mixture.streams[src].used()
            return image, text, where_read

    def _warn_repeats(self, read: list[tuple[int, int, int]]) -> None:
        """Say so when the slot's first contrastive batch holds a record twice: from the
        sources' start, that means a source's share of this slot has fewer pairs than the batch
        draws from it, so every batch repeats pairs, and CLIP's loss takes the copies for
        negatives of each other. (Counting records up front is not cheap for every format.)"""
        distinct = len(set(read))
        if distinct == len(read):
            return
        paths = ", ".join(sorted({str(self.s.sources[src].path) for src, _, _ in read}))
        logger.warning(
            "a contrastive batch of %d pairs (train.micro_batch_size) holds only %d "
            "distinct image-caption pairs of %s on this loader slot: pairs repeat in every "
            "batch and CLIP's loss takes the copies for negatives; lower "
            "train.micro_batch_size or add pairs",
            len(read),
            distinct,
            paths,
        )

    def _batches(self) -> Iterator[PairBatch]:
        mixture = self._open_mixture()
        # At the sources' start (not a resume, whose first batch may straddle an epoch's end).
        check = self.s.needs_text and all(st.cursor == Cursor() for st in mixture.streams)
        while True:
            read = [self._next_pair(mixture) for _ in range(self.s.batch_size)]
            if self.s.distinct:
                read = list({where: (image, text, where) for image, text, where in read}.values())
            elif check:
                self._warn_repeats([w for _, _, w in read])
                check = False
            pairs = [(image, text) for image, text, _ in read]
            ids = [caption_ids(self.tok, text, self.s.max_len) for _, text in pairs]
            tokens = torch.full((len(ids), self.s.max_len), self.tok.pad_id, dtype=torch.long)
            for i, row in enumerate(ids):
                tokens[i, : len(row)] = torch.tensor(row)
            pixels = self.processor([image for image, _ in pairs])
            yield PairBatch(pixels, tokens, torch.tensor([len(r) for r in ids]))


def build_pair_loader(
    settings: PairSettings,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Loader:
    dataset = CaptionPairDataset(settings, tokenizer, processor, rank, world_size, num_workers)
    return loader_of(dataset, num_workers)
