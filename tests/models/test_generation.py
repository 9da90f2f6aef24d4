"""Generation (models/generation.py): greedy and sampled decoding with and without the KV cache,
stops, left padding, per-row KV caches, and step-wise decoding of a changing set of sequences."""

from __future__ import annotations

import pytest
import torch

from mm1.models.decoder import Decoder
from mm1.models.generation import DecodeBatch, Sampling, generate, left_pad
from mm1.models.kv_cache import KVCache
from mm1.models.mllm import MM1


@pytest.mark.parametrize("sample", [False, True])
def test_generate_with_and_without_cache_agree(sample: bool, tiny_model_config) -> None:
    torch.manual_seed(0)
    model = MM1(tiny_model_config("avgpool", tie_embeddings=True)).eval()
    img, q = model.image_token_id, model.num_image_tokens
    prompts = [[1, 2] + [img] * q + [3, 4] + [img] * q + [5], [6] + [img] * q + [7]]
    pixels = torch.randn(3, 3, 32, 32)
    kw = dict(max_new_tokens=8, do_sample=sample, temperature=1.5, top_k=20, top_p=0.9)
    cached = generate(model, prompts, pixels, generator=torch.Generator().manual_seed(3), **kw)
    plain = generate(
        model, prompts, pixels, use_cache=False, generator=torch.Generator().manual_seed(3), **kw
    )
    assert cached == plain
    assert all(len(s) == 8 for s in cached)
    # a prompt alone gives the same continuation as inside a left-padded batch (greedy)
    if not sample:
        alone = generate(model, [prompts[1]], pixels[2:], max_new_tokens=8)
        assert alone[0] == cached[1]


def test_generate_stops_at_eos_and_stop_strings(tiny_model_config) -> None:
    torch.manual_seed(0)
    model = MM1(tiny_model_config("avgpool")).eval()
    prompt = [[1, 2, 3]]
    free = generate(model, prompt, max_new_tokens=6)[0]
    eos = generate(model, prompt, max_new_tokens=6, eos_token_id=free[2])[0]
    assert eos == free[: free.index(free[2]) + 1]

    class Chars:
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(97 + i % 26) for i in ids)

    stop = Chars().decode(free[1:3])
    out = generate(model, prompt, max_new_tokens=6, stop_strings=[stop], tokenizer=Chars())[0]
    assert out == free[:3]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt, stop_strings=["x"])


def test_left_pad_right_aligns_prompts_as_documents() -> None:
    batch = left_pad([[5, 6, 7], [8]], pad_token_id=9)
    assert batch.input_ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert batch.document_ids.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_kv_cache_reorder_copies_rows(tiny_model_config) -> None:
    """`reorder` equals copying each row's keys, values, document ids and length by hand."""
    cfg = tiny_model_config().decoder
    cache = KVCache(cfg, 3, 6, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    for x in [*cache.k, *cache.v]:
        x.copy_(torch.randn(x.shape, generator=gen))
    cache.doc.copy_(torch.randint(0, 3, cache.doc.shape, generator=gen))
    cache.lengths = [4, 2, 5]
    index = torch.tensor([2, 0, 0, 1])
    want_k = [torch.stack([k[i] for i in index.tolist()]) for k in cache.k]
    want_v = [torch.stack([v[i] for i in index.tolist()]) for v in cache.v]
    want_doc = torch.stack([cache.doc[i] for i in index.tolist()])
    cache.reorder(index)
    for got, want in zip([*cache.k, *cache.v, cache.doc], [*want_k, *want_v, want_doc]):
        assert torch.equal(got, want)
    assert cache.lengths == [5, 4, 4, 2] and cache.batch == 4


def test_kv_cache_rows_of_different_lengths_decode_like_full_forwards(tiny_model_config) -> None:
    """Rows at different lengths, stepped in a changing order and subset, give each sequence's
    full-forward logits; a row refilled from slot 0 ignores what it held before."""
    torch.manual_seed(0)
    cfg = tiny_model_config(qk_norm=True).decoder
    dec = Decoder(cfg).eval()
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (9, 7, 8)]
    cache = KVCache(cfg, 2, 10, "cpu", torch.float32)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    with torch.no_grad():
        # seq 0 prefilled 5 tokens in row 1, seq 1 prefilled 2 tokens in row 0
        got[0].append(dec(torch.tensor([seqs[0][:5]]), cache=cache.select([1])))
        got[1].append(dec(torch.tensor([seqs[1][:2]]), cache=cache.select([0])))
        for i in range(4):  # both step together, listed in the other order
            step = torch.tensor([[seqs[0][5 + i]], [seqs[1][2 + i]]])
            out = dec(step, cache=cache.select([1, 0]))
            got[0].append(out[:1])
            got[1].append(out[1:])
        cache.reset([0])  # seq 1 leaves; seq 2 takes its row
        got[2].append(dec(torch.tensor([seqs[2][:3]]), cache=cache.select([0])))
        for i in range(5):
            got[2].append(dec(torch.tensor([[seqs[2][3 + i]]]), cache=cache.select([0])))
        full = [dec(torch.tensor([s])) for s in seqs]
    for s in range(3):
        pieces = torch.cat(got[s], 1)
        n = pieces.shape[1]
        torch.testing.assert_close(pieces, full[s][:, :n], atol=1e-5, rtol=1e-5)
    assert cache.lengths == [8, 9]


@pytest.mark.parametrize(("compile", "max_len"), [(False, 40), (True, 40), (True, 200)])
@pytest.mark.parametrize("decoder", [{}, {"sliding_window": 6}])
def test_step_wise_decoding_with_joins_and_leaves_equals_generate_alone(
    decoder: dict, compile: bool, max_len: int, tiny_model_config
) -> None:
    """Three prompts (two with images): A and B join first, C after two steps; B leaves after
    three tokens and D takes its freed row. Every sequence's greedy tokens are what `generate`
    gives it alone. Compiled, every step runs all three rows, fed or not, and a row with nothing
    to feed (free, or joined but not yet fed) writes only to the scratch slot: after each step
    the keys, values and document ids of every current sequence's slots are the eager batch's,
    run beside it through the same joins and leaves. With 200 slots (256 in storage) a step
    attends over the first 64 only, and the scratch slot lies beyond them."""
    torch.manual_seed(1)
    model = MM1(tiny_model_config("avgpool", **decoder)).eval()
    img, q = model.image_token_id, model.num_image_tokens
    pixels = torch.randn(4, 3, 32, 32)
    prompts = {
        "A": ([1, 2] + [img] * q + [3, 4] + [img] * q + [5], pixels[:2]),
        "B": ([6, 7, 8], None),
        "C": ([9] + [img] * q + [10, 11, 12, 13], pixels[2:3]),
        "D": ([14] + [img] * q + [15], pixels[3:]),
    }
    steps = 7
    alone = {
        name: generate(model, [ids], px, max_new_tokens=steps)[0]
        for name, (ids, px) in prompts.items()
    }
    batch = DecodeBatch(model, max_batch=3, max_len=max_len, compile=compile)
    twin = DecodeBatch(model, max_batch=3, max_len=max_len) if compile else None
    both = [batch] if twin is None else [batch, twin]

    def prefill(*args) -> list[int]:
        ids = [x.prefill(*args) for x in both]
        assert ids[0] == ids[-1]
        return ids[0]

    a, b = prefill([prompts["A"][0], prompts["B"][0]], pixels[:2])
    names = {a: "A", b: "B"}
    got: dict[str, list[int]] = {n: [] for n in prompts}
    for i in range(steps + 3):
        if i == 2:
            (c,) = prefill([prompts["C"][0]], prompts["C"][1])
            names[c] = "C"
        if i == 3:
            for x in both:
                x.release(b)
            assert batch.free_rows == 1
            (d,) = prefill([prompts["D"][0]], prompts["D"][1])
            names[d] = "D"
        chosen = [x.step() for x in both]
        assert chosen[0] == chosen[-1]
        for sid, tok in chosen[0].items():
            got[names[sid]].append(tok)
        if twin is not None:
            for sid in batch.active:
                row = batch._seqs[sid].row
                n = batch.cache.lengths[row]
                assert n == twin.cache.lengths[row]
                for mine, theirs in [
                    *zip(batch.cache.k, twin.cache.k),
                    *zip(batch.cache.v, twin.cache.v),
                ]:
                    torch.testing.assert_close(mine[row, :, :n], theirs[row, :, :n])
                assert torch.equal(batch.cache.doc[row, :n], twin.cache.doc[row, :n])
        for sid in batch.active:
            if len(got[names[sid]]) == steps:
                for x in both:
                    x.release(sid)
    assert got["B"] == alone["B"][:3]
    for name in "ACD":
        assert got[name] == alone[name], name
    assert batch.active == [] and batch.free_rows == 3
    # Nothing anywhere in the storage is NaN, scratch slots included: a step over the whole
    # storage reads every slot, and a masked NaN value still poisons the weighted sum.
    assert not any(t.isnan().any() for t in [*batch.cache.k, *batch.cache.v])


def test_decode_batch_errors(tiny_model_config) -> None:
    model = MM1(tiny_model_config()).eval()
    batch = DecodeBatch(model, max_batch=2, max_len=5)
    with pytest.raises(ValueError, match="3 prompts but 2 free cache rows"):
        batch.prefill([[1], [2], [3]])
    with pytest.raises(ValueError, match="at least one token"):
        batch.prefill([[]])
    with pytest.raises(KeyError, match="no current sequence 7"):
        batch.release(7)
    (s,) = batch.prefill([[1, 2, 3, 4]])
    batch.step()
    batch.step()  # feeds the 5th token: the cache is full
    for _ in range(2):  # a failed step changes nothing
        with pytest.raises(ValueError, match="KV cache full: 6 slots needed, 5 allocated"):
            batch.step()
    batch.release(s)
    assert batch.step() == {} and batch.free_rows == 2


def test_compiled_decode_reuses_its_cache_and_graph(tiny_model_config) -> None:
    """Compiled generation: the same tokens as eager; a second call whose length falls in the
    same bucket borrows the first call's cache and replays its graph (no new compilation); a
    new length bucket, then a new batch size, compile once each (the size becomes symbolic),
    after which further buckets compile nothing; a call under inference_mode borrows the
    pooled cache too; a full cache is an error that changes nothing."""
    from torch._dynamo.utils import counters

    from mm1.models import compiled_decode

    torch.manual_seed(5)
    model = MM1(tiny_model_config()).eval()
    torch._dynamo.reset()  # what other tests compiled (and made dynamic) starts afresh

    def compiles(prompts: list[list[int]], new: int) -> int:
        """Checks compiled == eager tokens; returns the graphs the call compiled."""
        before = counters["stats"]["unique_graphs"]
        want = generate(model, prompts, max_new_tokens=new)
        assert generate(model, prompts, max_new_tokens=new, compile=True) == want
        return counters["stats"]["unique_graphs"] - before

    def prompt(n: int) -> list[int]:
        return [1 + (i * 7) % 10 for i in range(n)]

    assert compiles([prompt(6), prompt(2)], 9) == 1
    (pooled,) = compiled_decode._free[model][(2, 64, "cpu", torch.float32)]
    assert compiles([prompt(10), prompt(1)], 20) == 0  # 31 slots: the same 64-slot bucket
    assert compiled_decode._free[model][(2, 64, "cpu", torch.float32)] == [pooled]
    assert compiles([prompt(100), prompt(3)], 4) == 1  # 128 slots: the length turns symbolic
    assert compiles([prompt(150), prompt(3)], 4) == 0  # 192 slots
    assert compiles([prompt(5), prompt(3), prompt(7)], 4) == 1  # batch 3: symbolic too
    assert compiles([prompt(120), prompt(3), prompt(7)], 4) == 0
    with torch.inference_mode():  # the pooled cache serves inside inference_mode too
        assert generate(model, [prompt(10), prompt(1)], max_new_tokens=20, compile=True) == (
            generate(model, [prompt(10), prompt(1)], max_new_tokens=20)
        )
    assert compiled_decode._free[model][(2, 64, "cpu", torch.float32)] == [pooled]

    # 64 slots in the bucket: 63 usable, one scratch
    batch = DecodeBatch(model, max_batch=2, max_len=10, compile=True)
    assert batch.cache is pooled and batch.cache.k[0].shape[2] == 64
    (s,) = batch.prefill([[1 + i % 10 for i in range(62)]])
    batch.step()
    batch.step()  # feeds the 63rd token: the cache is full
    for _ in range(2):
        with pytest.raises(ValueError, match="KV cache full: 64 slots needed, 63 allocated"):
            batch.step()
    assert batch.cache.lengths == [63, 0]
    batch.release(s)
    compiled_decode.release_caches(model)
    assert model not in compiled_decode._free
    with pytest.raises(ValueError, match="needs use_cache=True"):
        generate(model, [prompt(3)], compile=True, use_cache=False)


def test_compiled_step_is_one_cuda_graph_trees_accept(monkeypatch, tiny_model_config) -> None:
    """The GPU path's acceptance, checked on the CPU: the step compiled as on CUDA
    (`reduce-overhead`, caches at static addresses), with inductor told not to turn CUDA graphs
    off for the CPU and its hand-over to cudagraph trees replaced by a recorder. Every graph
    must pass inductor's own tests, mutate only static inputs (cudagraph trees skip a graph that
    writes into any other input), and leave only the host's few bytes per row (tokens,
    positions, slots, flags) to copy in before each replay: no weight, no cache. Inductor
    internals, so a torch upgrade may have to update this test; torch 2.11 (the GPU machine's)
    and 2.13 give the same result."""
    import torch._inductor.cudagraph_utils as cudagraph_utils
    import torch._inductor.output_code as output_code

    from mm1.models import compiled_decode

    graphs: list[dict] = []

    def record(example_inputs, compiled_graph, cudagraphs, constants, device_index) -> None:
        static = set(compiled_graph.fx_kwargs["static_input_idxs"] or ())
        graphs.append(
            {
                "fail": compiled_graph.cudagraph_info.cudagraph_fail_reasons,
                "mutated": set(compiled_graph.mutated_input_idxs),
                "static": static,
                "copied": [
                    tuple(t.shape)
                    for i, t in enumerate(example_inputs)
                    if isinstance(t, torch.Tensor) and i not in static
                ],
            }
        )
        cudagraphs.value = False  # then run the compiled code as it is, on the CPU

    monkeypatch.setattr(cudagraph_utils, "check_lowering_disable_cudagraph", lambda _: None)
    monkeypatch.setattr(output_code, "cudagraph_post_compile", record)
    monkeypatch.setattr(output_code, "cudagraph_partition_post_compile", record)
    monkeypatch.setattr(compiled_decode, "replays_cuda_graphs", lambda device: True)
    monkeypatch.setattr(compiled_decode, "_compiled", {})
    torch._dynamo.reset()
    torch.manual_seed(6)
    model = MM1(tiny_model_config()).eval()
    short, long = [1 + i % 10 for i in range(6)], [1 + (i * 7) % 10 for i in range(100)]
    try:
        with torch.inference_mode():
            for prompts in ([short], [long, short]):  # the second: batch and length symbolic
                want = generate(model, prompts, max_new_tokens=5)
                assert generate(model, prompts, max_new_tokens=5, compile=True) == want
    finally:
        compiled_decode.release_caches(model)
        torch._dynamo.reset()
    assert len(graphs) == 2
    for graph in graphs:
        assert graph["fail"] == []
        assert len(graph["mutated"]) == 1 + 2 * model.cfg.decoder.layers  # doc, k and v
        assert graph["mutated"] <= graph["static"]
        assert len(graph["copied"]) == 4
        assert all(shape[1:] in [(), (1,)] for shape in graph["copied"])


def test_generate_is_a_decode_batch_run_to_the_end(tiny_model_config) -> None:
    """Sampling included: all prompts joining at once and none leaving draws what `generate`
    draws from the same generator."""
    torch.manual_seed(2)
    model = MM1(tiny_model_config()).eval()
    prompts = [[1, 2, 3], [4], [5, 6]]
    want = generate(
        model, prompts, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(4)
    )
    seeded = torch.Generator().manual_seed(4)
    batch = DecodeBatch(model, 3, 8, sampling=Sampling(do_sample=True), generator=seeded)
    ids = batch.prefill(prompts)
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(5):
        chosen = batch.step()
        for i, sid in enumerate(ids):
            got[i].append(chosen[sid])
    assert got == want


def test_a_sequence_with_its_own_generator_samples_the_same_beside_others(
    tiny_model_config,
) -> None:
    """A server's request: its own sampling settings and seeded generator draw the same tokens
    alone and beside a greedy sequence and another sampled one; the greedy one stays greedy."""
    torch.manual_seed(3)
    model = MM1(tiny_model_config()).eval()
    hot = Sampling(do_sample=True, temperature=1.3, top_p=0.9)

    def run(prompts: list[list[int]], sampling: list, seeds: list) -> list[list[int]]:
        batch = DecodeBatch(model, 3, 16)
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        ids = batch.prefill(prompts, sampling=sampling, generators=gens)
        out: list[list[int]] = [[] for _ in prompts]
        for _ in range(8):
            chosen = batch.step()
            for i, sid in enumerate(ids):
                out[i].append(chosen[sid])
        return out

    (alone,) = run([[1, 2, 3]], [hot], [11])
    together = run([[7], [1, 2, 3], [4, 5]], [None, hot, Sampling(do_sample=True)], [None, 11, 5])
    assert together[1] == alone
    assert together[0] == generate(model, [[7]], max_new_tokens=8)[0]
    assert run([[1, 2, 3]], [hot], [12])[0] != alone  # the seed matters
    with pytest.raises(ValueError, match="one entry per prompt"):
        DecodeBatch(model, 2, 8).prefill([[1], [2]], sampling=[hot])


def test_a_tiny_temperature_samples_the_argmax() -> None:
    """Inside OpenAI's range, 1e-40 is greedy in effect: dividing the logits first overflowed
    them to inf and the probabilities to NaN, and the sampling raised."""
    from mm1.models.generation import next_token

    logits = torch.randn(3, 50) * 20
    logits[1, 7] = float("-inf")  # a masked token stays out
    for t in (1e-40, 1e-30, 1e-8):
        chosen = next_token(logits, Sampling(do_sample=True, temperature=t))
        assert chosen.tolist() == logits.argmax(-1).tolist()


def test_a_prefill_that_fails_keeps_its_rows_free(tiny_model_config) -> None:
    """A failed prefill (on a GPU: out of memory) gave its rows away for good: a server's batch
    lost a row at each failure, until no request could join."""
    torch.manual_seed(0)
    model = MM1(tiny_model_config()).eval()
    batch = DecodeBatch(model, 2, 16)

    def fail(*_) -> None:
        raise RuntimeError("out of memory (simulated)")

    hook = model.decoder.register_forward_pre_hook(fail)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="simulated"):
            batch.prefill([[1, 2, 3], [4, 5]])
        assert batch.free_rows == 2
    hook.remove()
    ids = batch.prefill([[1, 2, 3], [4, 5]])
    assert batch.free_rows == 0
    chosen = batch.step()
    assert list(chosen) == ids
    assert [chosen[ids[0]]] == generate(model, [[1, 2, 3]], max_new_tokens=1)[0]
