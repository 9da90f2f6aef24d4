"""The decoder's KV cache: preallocated keys and values per layer for generation, and the view
a fixed-shape (compiled) decode step takes of it. Decode-time state, kept apart from the model
(`models/decoder.py` reads it through `begin`, `update_doc`, `update` and `advance`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from mm1.config import DecoderConfig


class KVCache:
    """Preallocated keys and values per layer, the document id of every cached slot (so left
    padding is simply another document that real tokens never attend to) and each row's length.

    Rows are independent sequences with their own lengths, so sequences of different ages can
    share one cache (continuous batching). A forward runs on every row, or on some through
    `select`; a row's new tokens go to the slots after its length, and a query sees only its own
    row's slots up to its own (causal), so whatever a freed row held before is never read.

    With `scratch`, the storage has one slot more than `max_len`: a fixed-shape decode step
    (`SlotView`) runs every row, and a row with no token to feed writes there, where no query
    ever looks (every real query sits at a slot below `max_len`).
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        batch: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        scratch: bool = False,
    ) -> None:
        slots = max_len + 1 if scratch else max_len
        shape = (batch, cfg.kv_heads, slots, cfg.resolved_head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.doc = torch.zeros(batch, slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self.lengths = [0] * batch  # on the host: slots are chosen without a device sync
        self._rows: list[int] | None = None  # the rows a forward runs on; None: all, in order
        # Set by `begin` for the forward under way: each row's first new slot (int: shared),
        # the key length, and for gathered rows the (n, 1) row and (n, t) slot indices.
        self._offset: int | torch.Tensor = 0
        self._end = 0
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def select(self, rows: Sequence[int]) -> KVCache:
        """A view for one forward over `rows` (in that order). It shares this cache's storage
        and lengths, so what the forward writes lands here; make a new view after `reorder`."""
        view = copy.copy(self)
        if list(rows) != list(range(self.batch)):  # all rows in order: plain slices, no gathers
            view._rows = list(rows)
        return view

    def reset(self, rows: Sequence[int]) -> None:
        """Empty `rows`: the next sequence in each starts at slot 0."""
        for r in rows:
            self.lengths[r] = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Make row r a copy of row index[r] (beam search: beams continue other beams' prefixes);
        the cache becomes len(index) rows."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.doc = self.doc.index_select(0, index)
        self.lengths = [self.lengths[i] for i in index.tolist()]

    def begin(self, t: int) -> tuple[int | torch.Tensor, int]:
        """Start a forward of `t` new tokens per active row. Returns each row's first new slot
        (an int when the rows share it, else a (n,) tensor) and the key length attended over
        (the longest row's)."""
        rows = self._rows if self._rows is not None else range(self.batch)
        lengths = [self.lengths[r] for r in rows]
        self._end = max(lengths) + t
        if self._end > self.max_len:
            raise ValueError(f"KV cache full: {self._end} slots needed, {self.max_len} allocated")
        device = self.doc.device
        shared = len(set(lengths)) == 1
        self._offset = lengths[0] if shared else torch.tensor(lengths, device=device)
        self._index = None
        if self._rows is not None or not shared:
            row_index = torch.tensor(list(rows), device=device)[:, None]
            first = torch.tensor(lengths, device=device)[:, None]
            self._index = (row_index, first + torch.arange(t, device=device))
        return self._offset, self._end

    def update_doc(self, doc_q: torch.Tensor) -> torch.Tensor:
        """Record the new tokens' document ids; returns the active rows' ids of every key slot."""
        if self._index is None:
            o = self._offset
            self.doc[:, o : o + doc_q.shape[1]] = doc_q
            return self.doc[:, : self._end]
        rows, slots = self._index
        self.doc[rows, slots] = doc_q
        return self.doc[rows[:, 0], : self._end]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (n, H, t, D); returns the active rows' keys and values
        of every slot up to the key length."""
        end = self._end
        if self._index is None:
            o = self._offset
            self.k[layer][:, :, o : o + k.shape[2]] = k
            self.v[layer][:, :, o : o + k.shape[2]] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        rows, slots = self._index  # indexing (B, H, L, D) with them gives (n, t, H, D)
        self.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer][rows[:, 0], :, :end], self.v[layer][rows[:, 0], :, :end]

    def advance(self, t: int) -> None:
        """End the forward: the active rows hold `t` more tokens."""
        for r in self._rows if self._rows is not None else range(self.batch):
            self.lengths[r] += t


class SlotView:
    """A KV cache's storage as a fixed-shape decode step sees it: one new token in every row,
    written at that row's slot in `slots` (B,), attending over the first `end` slots of every
    row as a query at its slot in `query` (default: `slots`), masked by slot and document.
    Nothing here reads host state, so the step compiles once (`end` varies by whole buckets and
    becomes a symbolic size) and a CUDA graph can replay it; the caller keeps the cache's
    lengths on the host and points a row with nothing to feed at the scratch slot
    (`KVCache(scratch=True)`), beyond `end` or not."""

    def __init__(
        self,
        k: Sequence[torch.Tensor],
        v: Sequence[torch.Tensor],
        doc: torch.Tensor,
        slots: torch.Tensor,
        end: int,
        query: torch.Tensor | None = None,
    ) -> None:
        self.k, self.v, self.doc, self.slots, self.end = k, v, doc, slots, end
        self.query = slots if query is None else query
        self.rows = torch.arange(slots.shape[0], device=slots.device)

    def begin(self, t: int) -> tuple[torch.Tensor, int]:
        if t != 1:
            raise ValueError(f"a fixed-shape decode step feeds one token per row, not {t}")
        return self.query, self.end

    def update_doc(self, doc_q: torch.Tensor) -> torch.Tensor:
        self.doc[self.rows, self.slots] = doc_q[:, 0]
        return self.doc[:, : self.end]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, H, L, D) indexed by (B,) rows and (B,) slots around a slice is (B, H, D).
        self.k[layer][self.rows, :, self.slots] = k[:, :, 0]
        self.v[layer][self.rows, :, self.slots] = v[:, :, 0]
        return self.k[layer][:, :, : self.end], self.v[layer][:, :, : self.end]

    def advance(self, t: int) -> None:
        """Nothing: the caller advances the lengths of the rows that fed a token."""
