"""The decode step at fixed shapes, compiled: on CUDA captured as a CUDA graph.

Batch-1 decoding of a 1B model is bound by Python and kernel launches, not by the GPU
(docs/benchmarks.md section 5: about 25 ms per token where the weights take 0.6 ms to read).
A step that always runs every cache row, over the keys up to the 64-slot bucket holding the
rows' new slots, changes shape only by whole buckets, so `torch.compile` traces it once
(`reduce-overhead` on CUDA: each shape is recorded as one CUDA graph and replayed) and the host
only fills in tokens, positions and slots. A row with nothing to feed writes to the cache's scratch slot, which no query reads.
A second batch size or cache length compiles once more with that size symbolic (dynamo's
automatic dynamic shapes), after which new sizes reuse that graph: evaluation's varying
prompt lengths cost two or three compilations in all, not one per length.

The caches live in a pool kept with their model: the next `generate` of the same batch size and
length bucket borrows the same storage, so the CUDA graph recorded over it is replayed rather
than recorded again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

from mm1.models.kv_cache import KVCache, SlotView
from mm1.models.mllm import MLLM

# Cache storage (max_len plus the scratch slot) is rounded up to a multiple of this, so prompts
# of similar lengths share one compiled step and attention kernels see aligned key lengths; the
# extra slots cost attention over masked keys, nothing else.
LENGTH_BUCKET = 64


def decode_logits(
    model: MLLM,
    cache: KVCache | SlotView,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one token per cache row ((n, 1) tokens at (n, 1) positions, of document 1 unless
    `document_ids` says otherwise); (n, vocab) fp32 logits."""
    logits = model.decoder(
        inputs_embeds=model.decoder.embed(tokens),
        position_ids=positions,
        document_ids=torch.ones_like(positions) if document_ids is None else document_ids,
        cache=cache,
    )
    return model.text_logits(logits[:, -1]).float()


def _step(
    model: MLLM,
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    doc: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    fed: torch.Tensor,
    end: int,
) -> torch.Tensor:
    """The compiled function: every row at once ((B, 1) tokens, positions and `fed` flags,
    (B,) slots), attending over the first `end` slots. A fed token is of document 1 and queries
    at its slot. A row with nothing to feed writes to the scratch slot but queries at slot 0
    with slot 0's document, so it always sees a key (a sliding window included): its output,
    discarded, is finite, and so is what it writes. That matters: a step whose `end` covers
    the scratch slot reads it, masked, and a masked NaN would still poison the weighted sum."""
    document_ids = torch.where(fed, 1, doc[:, :1])
    query = torch.where(fed[:, 0], slots, 0)
    view = SlotView(k, v, doc, slots, end, query)
    return decode_logits(model, view, tokens, positions, document_ids)


def replays_cuda_graphs(device: torch.device) -> bool:
    """Whether the step is compiled in `reduce-overhead` mode on `device`: recorded as CUDA
    graphs, with the caches at static addresses. One switch, so a test can check on the CPU
    that cudagraph trees would accept the step."""
    return device.type == "cuda"


_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_step(device: torch.device) -> Callable[..., torch.Tensor]:
    """One compiled step per device type; dynamo keeps its graphs (static, then dynamic)."""
    if device.type not in _compiled:
        mode = "reduce-overhead" if replays_cuda_graphs(device) else None
        _compiled[device.type] = torch.compile(_step, mode=mode)
    return _compiled[device.type]


# model -> {(batch, storage slots, device, dtype): caches not in use}
_free: weakref.WeakKeyDictionary[MLLM, dict[tuple, list[KVCache]]] = weakref.WeakKeyDictionary()


def _give_back(model_ref: weakref.ref[MLLM], key: tuple, cache: KVCache) -> None:
    model = model_ref()
    if model is not None:
        _free.setdefault(model, {}).setdefault(key, []).append(cache)


def release_caches(model: MLLM) -> None:
    """Free the pooled decode caches of `model` (those not in use)."""
    _free.pop(model, None)


class CompiledDecode:
    """A KV cache of `batch` rows and at least `max_len` slots (storage: a multiple of
    `LENGTH_BUCKET`, the scratch slot included), and the compiled step over it.

    `cache` is an ordinary `KVCache` (prefill fills it through `select`); calling this object
    runs the fixed-shape step for some of its rows and advances their lengths."""

    def __init__(self, model: MLLM, batch: int, max_len: int) -> None:
        weight = model.decoder.embed_tokens.weight
        slots = -(-(max_len + 1) // LENGTH_BUCKET) * LENGTH_BUCKET
        key = (batch, slots, str(weight.device), weight.dtype)
        pooled = _free.get(model, {}).get(key)
        if pooled:
            self.cache = pooled.pop()
            self.cache.reset(range(batch))
        else:
            # Normal tensors even under inference_mode: a pooled cache may serve both.
            with torch.inference_mode(False):
                self.cache = KVCache(
                    model.cfg.decoder, batch, slots - 1, weight.device, weight.dtype, scratch=True
                )
            if replays_cuda_graphs(weight.device):  # graphs write into these: fixed addresses
                for t in [*self.cache.k, *self.cache.v, self.cache.doc]:
                    torch._dynamo.mark_static_address(t, guard=False)
        self.model = model
        self._fn = _compiled_step(weight.device)
        weakref.finalize(self, _give_back, weakref.ref(model), key, self.cache)

    def __call__(
        self, rows: Sequence[int], tokens: torch.Tensor, positions: Sequence[int]
    ) -> torch.Tensor:
        """Feed `tokens` (n,) at `positions` to cache `rows`; their (n, vocab) fp32 logits."""
        cache = self.cache
        longest = max(cache.lengths[r] for r in rows) + 1
        if longest > cache.max_len:
            raise ValueError(f"KV cache full: {longest} slots needed, {cache.max_len} allocated")
        device = cache.doc.device
        slots = [cache.max_len] * cache.batch  # rows without a token write to the scratch slot
        pos = [0] * cache.batch
        fed = [False] * cache.batch
        for r, p in zip(rows, positions):
            slots[r], pos[r], fed[r] = cache.lengths[r], p, True
        # One host-to-device copy for everything the host decides: rows, slots, positions, flags.
        padded = [*rows, *[0] * (cache.batch - len(rows))]
        host = torch.tensor([padded, slots, pos, fed], device=device)
        index, write, at, flags = host[0, : len(rows)], host[1], host[2], host[3].bool()
        feed = torch.zeros(cache.batch, dtype=torch.long, device=device)
        feed.index_copy_(0, index, tokens.to(device=device, dtype=torch.long))
        # Keys up to the bucket holding every fed row's new slot: a long cache (a server's
        # whole context) costs attention only over what its rows hold.
        end = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, cache.k[0].shape[2])
        if replays_cuda_graphs(device):  # the previous step's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._fn(
            self.model,
            cache.k,
            cache.v,
            cache.doc,
            feed[:, None],
            at[:, None],
            write,
            flags[:, None],
            end,
        )
        for r in rows:
            cache.lengths[r] += 1
        # A copy: a CUDA graph's output buffer is overwritten by the next replay.
        return logits.index_select(0, index)
