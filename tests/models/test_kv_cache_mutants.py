"""KV cache behaviour the generation tests left unpinned (found by mutation testing): the key
length of a forward over rows of different lengths whichever row comes first, and the
fixed-shape decode view's query slots and one-token rule."""

from __future__ import annotations

import pytest
import torch

from mm1.models.decoder import Decoder
from mm1.models.kv_cache import KVCache, SlotView


def test_rows_of_different_lengths_attend_over_the_longest_row(tiny_model_config) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config().decoder
    dec = Decoder(cfg).eval()
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (6, 9)]
    cache = KVCache(cfg, 2, 10, "cpu", torch.float32)
    got: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        got[0].append(dec(torch.tensor([seqs[0][:2]]), cache=cache.select([0])))
        got[1].append(dec(torch.tensor([seqs[1][:5]]), cache=cache.select([1])))
        for i in range(4):  # the shorter row first: the key length is the longer row's
            step = torch.tensor([[seqs[0][2 + i]], [seqs[1][5 + i]]])
            out = dec(step, cache=cache.select([0, 1]))
            got[0].append(out[:1])
            got[1].append(out[1:])
        full = [dec(torch.tensor([s])) for s in seqs]
    for s in range(2):
        pieces = torch.cat(got[s], 1)
        torch.testing.assert_close(pieces, full[s][:, : pieces.shape[1]], atol=1e-5, rtol=1e-5)
    assert cache.lengths == [6, 9]


def test_begin_returns_each_rows_offset_and_the_longest_key_length(tiny_model_config) -> None:
    cfg = tiny_model_config().decoder
    cache = KVCache(cfg, 3, 10, "cpu", torch.float32)
    cache.lengths = [2, 5, 3]
    offset, end = cache.begin(2)
    assert offset.tolist() == [2, 5, 3] and end == 7
    offset, end = cache.select([2, 0]).begin(1)
    assert offset.tolist() == [3, 2] and end == 4
    with pytest.raises(ValueError, match="KV cache full: 11 slots needed, 10 allocated"):
        cache.begin(6)


def _view(query=None) -> SlotView:
    k = [torch.zeros(2, 1, 5, 4)]
    v = [torch.zeros(2, 1, 5, 4)]
    doc = torch.zeros(2, 5, dtype=torch.long)
    return SlotView(k, v, doc, torch.tensor([1, 4]), 3, query)


def test_slot_view_queries_where_it_is_told() -> None:
    query = torch.tensor([1, 0])  # row 1 writes to the scratch slot 4 but queries at slot 0
    got, end = _view(query).begin(1)
    assert got.tolist() == [1, 0] and end == 3
    assert _view().begin(1)[0].tolist() == [1, 4]  # default: the written slots


def test_slot_view_feeds_one_token_per_row() -> None:
    with pytest.raises(ValueError, match="one token per row, not 2"):
        _view().begin(2)
