"""Packing tokenized documents into fixed-length sequences with document boundaries.

A text or interleaved document longer than the sequence is cut into pieces at text/image
boundaries (never inside an image's slot block); a piece with more images than the
per-sequence cap keeps the first ones and drops the rest with their placeholders (counted).
A caption pair or a conversation longer than the sequence keeps its head and loses its tail
(counted), as LLaVA truncates at its maximum length: a later piece of it would train the
caption or the answers without the image they are about. Pieces are packed first-fit from a
small buffer, and the gap left at the end of a sequence is filled with the head of a text or
interleaved piece cut to size, so padding stays rare without dropping anything.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mm1.batch import IGNORE_INDEX, Batch
from mm1.data.tokenizer import TokenizedDocument

# Kinds whose documents may be cut anywhere outside an image (to fill a sequence's tail); the
# others (caption pairs, conversations) are truncated to one sequence instead.
FILLER_KINDS = ("text", "interleaved")


class UnfitDocument(ValueError):
    """A document that cannot be packed usefully; `reason` is what the loader counts it as."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Piece:
    """A contiguous slice of a tokenized document, packed as a document of its own.

    `ref` identifies where it came from (the loader uses it to rebuild the buffer on resume):
    (source index, shard index, record index, piece index, tokens already consumed). The source
    index is the dataset (`data.sources[i]`) the piece's tokens count in.
    """

    doc: TokenizedDocument
    ref: tuple[int, ...] = ()
    first: bool = True  # the piece starts its document (counts the document in statistics)

    def __len__(self) -> int:
        return len(self.doc.input_ids)

    @property
    def key(self) -> tuple:
        """Identifies the document the piece belongs to."""
        return (self.doc.id, *self.ref[:3])

    @property
    def num_images(self) -> int:
        return len(self.doc.images)

    @property
    def dataset(self) -> int:
        """Index of the source (dataset) the piece came from; -1 when not known."""
        return self.ref[0] if self.ref else -1


def slice_document(doc: TokenizedDocument, start: int, end: int) -> TokenizedDocument:
    """Tokens [start, end) of a document with the images whose slot blocks lie inside."""
    keep = [i for i, (a, b) in enumerate(doc.image_spans) if start <= a and b <= end]
    for a, b in doc.image_spans:
        if a < start < b or a < end < b:
            raise ValueError(f"cut at {start}..{end} splits an image of document {doc.id!r}")
    return TokenizedDocument(
        input_ids=doc.input_ids[start:end],
        target_mask=doc.target_mask[start:end],
        images=[doc.images[i] for i in keep],
        kind=doc.kind,
        id=doc.id,
        image_spans=[(doc.image_spans[i][0] - start, doc.image_spans[i][1] - start) for i in keep],
    )


def drop_images(doc: TokenizedDocument, keep: int) -> TokenizedDocument:
    """Keep the first `keep` images; later images go with their placeholder slots."""
    if len(doc.images) <= keep:
        return doc
    removed = doc.image_spans[keep:]
    ids: list[int] = []
    mask: list[bool] = []
    last = 0
    for a, b in removed:
        ids += doc.input_ids[last:a]
        mask += doc.target_mask[last:a]
        last = b
    ids += doc.input_ids[last:]
    mask += doc.target_mask[last:]
    return TokenizedDocument(ids, mask, doc.images[:keep], doc.kind, doc.id, doc.image_spans[:keep])


def cut_points(doc: TokenizedDocument, anywhere: bool) -> list[int]:
    """Sorted positions where the document may be cut: image block edges, and with `anywhere`
    every position outside an image block."""
    n = len(doc.input_ids)
    if anywhere:
        inside = bytearray(n + 1)
        for a, b in doc.image_spans:
            inside[a + 1 : b] = b"\x01" * (b - a - 1)
        return [i for i in range(1, n) if not inside[i]]
    edges = {e for span in doc.image_spans for e in span}
    return sorted(e for e in edges if 0 < e < n)


def _last_cut(cuts: list[int], start: int, seq_len: int) -> int | None:
    """The last cut in (start, start + seq_len], or None."""
    i = bisect.bisect_right(cuts, start + seq_len) - 1
    return cuts[i] if i >= 0 and cuts[i] > start else None


def split_document(
    doc: TokenizedDocument, seq_len: int, max_images: int
) -> tuple[list[TokenizedDocument], int]:
    """Cut a document into pieces of at most `seq_len` tokens and `max_images` images (a
    caption pair or a conversation: its head, see `truncate`).

    Returns the pieces and the number of images dropped by the cap.
    """
    n = len(doc.input_ids)
    pieces: list[TokenizedDocument] = []
    if doc.kind not in FILLER_KINDS:
        pieces = [truncate(doc, seq_len, max_images)]
    elif n > seq_len:
        cuts = cut_points(doc, anywhere=True)
        start = 0
        while n - start > seq_len:
            cut = _last_cut(cuts, start, seq_len)
            if cut is None:
                raise _image_too_long(doc, seq_len)
            pieces.append(slice_document(doc, start, cut))
            start = cut
        pieces.append(slice_document(doc, start, n))
    else:
        pieces = [doc]
    dropped = 0
    for i, p in enumerate(pieces):
        if len(p.images) > max_images:
            dropped += len(p.images) - max_images
            pieces[i] = drop_images(p, max_images)
    return pieces, dropped


def truncate(doc: TokenizedDocument, seq_len: int, max_images: int) -> TokenizedDocument:
    """A caption pair's or a conversation's first `seq_len` tokens, cut outside an image.
    `UnfitDocument` when what is left has nothing to learn (every target in the tail), and for
    a conversation with more images than `max_images`: dropping some would leave its questions
    about images it does not show."""
    if doc.kind == "sft" and len(doc.images) > max_images:
        raise UnfitDocument(
            "too_many_images",
            f"conversation {doc.id!r} has {len(doc.images)} images, more than "
            f"data.max_images_per_seq={max_images}",
        )
    if len(doc.input_ids) <= seq_len:
        return doc
    cut = _last_cut(cut_points(doc, anywhere=True), 0, seq_len)
    if cut is None:
        raise _image_too_long(doc, seq_len)
    head = slice_document(doc, 0, cut)
    if not any(head.target_mask[1:]):
        raise UnfitDocument(
            "too_long",
            f"document {doc.id!r}: nothing to learn within data.seq_len={seq_len} tokens "
            f"(it has {len(doc.input_ids)}; its first target comes later)",
        )
    return head


def _image_too_long(doc: TokenizedDocument, seq_len: int) -> UnfitDocument:
    return UnfitDocument(
        "too_long", f"document {doc.id!r} has an image block longer than seq_len={seq_len}"
    )


@dataclass
class PackStats:
    sequences: int = 0
    tokens: int = 0  # non-padding tokens emitted
    padding: int = 0
    # Both per kind, documents counted once each; `tokens_per_source` keeps its name because
    # saved loader states and `mm1 data stats` use it.
    documents: dict[str, int] = field(default_factory=dict)
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    images: int = 0
    images_dropped: int = 0
    # Tokens of the images kept (their slot blocks, boundary tokens included): a tiled layout
    # gives images different counts, so `tokens_per_image` is the mean.
    image_tokens: int = 0
    pieces_cut: int = 0  # documents cut across sequences (length or tail filling)
    truncated: int = 0  # caption pairs and conversations longer than a sequence: tails dropped
    tokens_truncated: int = 0
    # Padding of the sequences the image cap closed (no image slot left, room left): where
    # images cost few tokens, `max_images` rather than `seq_len` bounds a sequence.
    padding_image_cap: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackStats:
        return cls(
            **{k: d[k] for k in ("sequences", "tokens", "padding", "images", "images_dropped")},
            documents=dict(d["documents"]),
            tokens_per_source=dict(d["tokens_per_source"]),
            pieces_cut=d["pieces_cut"],
            # loader states saved before these existed
            image_tokens=d.get("image_tokens", 0),
            truncated=d.get("truncated", 0),
            tokens_truncated=d.get("tokens_truncated", 0),
            padding_image_cap=d.get("padding_image_cap", 0),
        )

    @property
    def efficiency(self) -> float:
        total = self.tokens + self.padding
        return self.tokens / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        docs = sum(self.documents.values()) or 1
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "padding": self.padding,
            "packing_efficiency": self.efficiency,
            "documents": dict(self.documents),
            "mixture": {k: v / docs for k, v in sorted(self.documents.items())},
            "tokens_per_source": dict(self.tokens_per_source),
            "images": self.images,
            "images_dropped": self.images_dropped,
            "images_dropped_fraction": self.images_dropped
            / max(1, self.images + self.images_dropped),
            "image_tokens": self.image_tokens,
            "tokens_per_image": self.image_tokens / max(1, self.images),
            "pieces_cut": self.pieces_cut,
            "truncated": self.truncated,
            "tokens_truncated": self.tokens_truncated,
            "padding_image_cap": self.padding_image_cap,
        }


class Packer:
    """Streams pieces in, sequences out. Feed it with `add` while `wants_more()`."""

    def __init__(
        self, seq_len: int, max_images: int, buffer_size: int = 32, min_fill: int = 8
    ) -> None:
        self.seq_len, self.max_images = seq_len, max_images
        self.buffer_size, self.min_fill = buffer_size, min_fill
        self.buffer: list[Piece] = []
        self.stats = PackStats()

    def wants_more(self) -> bool:
        return len(self.buffer) < self.buffer_size

    def add(self, doc: TokenizedDocument, ref: tuple[int, ...] = ()) -> None:
        pieces, dropped = split_document(doc, self.seq_len, self.max_images)
        self.stats.images_dropped += dropped
        if doc.kind not in FILLER_KINDS and len(pieces[0]) < len(doc):
            self.stats.truncated += 1
            self.stats.tokens_truncated += len(doc) - len(pieces[0])
        for i, p in enumerate(pieces):
            self.buffer.append(Piece(p, (*ref, i, 0), first=i == 0))

    def restore(self, piece: Piece) -> None:
        """Put back a buffered piece rebuilt on resume (no statistics counted again)."""
        self.buffer.append(piece)

    def next_sequence(self) -> list[Piece]:
        """First-fit from the buffer (oldest first), then fill the tail by cutting a piece."""
        room, images = self.seq_len, self.max_images
        chosen: list[Piece] = []
        waiting: set[tuple] = set()  # documents with an earlier piece still buffered
        i = 0
        while i < len(self.buffer):
            p = self.buffer[i]
            if p.key not in waiting and len(p) <= room and p.num_images <= images:
                chosen.append(self.buffer.pop(i))
                room -= len(p)
                images -= p.num_images
            else:
                waiting.add(p.key)
                i += 1
        if room >= self.min_fill:
            head = self._cut_filler(room, images)
            if head is not None:
                chosen.append(head)
                room -= len(head)
                images -= head.num_images
        if not chosen:
            raise RuntimeError("the packing buffer is empty")
        self._count(chosen, room)
        if images == 0 and self.max_images > 0:
            self.stats.padding_image_cap += room
        return chosen

    def _cut_filler(self, room: int, images: int) -> Piece | None:
        seen: set[tuple] = set()
        for i, p in enumerate(self.buffer):
            if p.key in seen:  # only the oldest piece of a document may be cut
                continue
            seen.add(p.key)
            if p.doc.kind not in FILLER_KINDS:
                continue
            cuts = cut_points(p.doc, anywhere=True)
            k = bisect.bisect_right(cuts, room) - 1
            # images whose slot block ends by the cut: the head may hold at most `images`
            while k >= 0 and sum(b <= cuts[k] for _, b in p.doc.image_spans) > images:
                k -= 1
            if k < 0 or cuts[k] < self.min_fill:
                continue
            cut = cuts[k]
            head = Piece(slice_document(p.doc, 0, cut), p.ref, p.first)
            # the reference's last field counts the tokens of the piece already emitted
            tail_ref = (*p.ref[:-1], p.ref[-1] + cut)
            self.buffer[i] = Piece(slice_document(p.doc, cut, len(p)), tail_ref, first=False)
            self.stats.pieces_cut += 1
            return head
        return None

    def _count(self, chosen: list[Piece], room: int) -> None:
        s = self.stats
        s.sequences += 1
        s.padding += room
        for p in chosen:
            s.tokens += len(p)
            s.images += p.num_images
            s.image_tokens += sum(b - a for a, b in p.doc.image_spans)
            s.tokens_per_source[p.doc.kind] = s.tokens_per_source.get(p.doc.kind, 0) + len(p)
            if p.first:
                s.documents[p.doc.kind] = s.documents.get(p.doc.kind, 0) + 1


def collate(
    sequences: Sequence[list[Piece]],
    seq_len: int,
    pad_id: int,
    kind_index: dict[str, int] | None = None,
    pixel_values: torch.Tensor | None = None,
    image_crops: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
) -> Batch:
    """Packed sequences -> the Batch contract. Labels never cross a piece; padding is one more
    document per row; `pixel_values` must hold the crops of all pieces' images in order
    (`image_crops` per image, `image_sizes` their original (height, width)). Kind ids
    follow `kind_index` (-1 without it), dataset ids the pieces' source index; both are -1
    on padding."""
    b = len(sequences)
    ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((b, seq_len), dtype=torch.long)
    doc_ids = torch.zeros((b, seq_len), dtype=torch.long)
    kinds = torch.full((b, seq_len), -1, dtype=torch.long)
    datasets = torch.full((b, seq_len), -1, dtype=torch.long)
    for row, pieces in enumerate(sequences):
        t = 0
        for d, p in enumerate(pieces):
            n = len(p)
            ids[row, t : t + n] = torch.tensor(p.doc.input_ids)
            labels[row, t : t + n] = torch.tensor(p.doc.labels())
            pos[row, t : t + n] = torch.arange(n)
            doc_ids[row, t : t + n] = d
            if kind_index is not None:
                kinds[row, t : t + n] = kind_index.get(p.doc.kind, -1)
            datasets[row, t : t + n] = p.dataset
            t += n
        doc_ids[row, t:] = len(pieces)
        pos[row, t:] = torch.arange(seq_len - t)
    return Batch(
        ids,
        labels,
        pos,
        doc_ids,
        pixel_values,
        kind_ids=kinds,
        dataset_ids=datasets,
        image_crops=image_crops,
        image_sizes=image_sizes,
    )
