"""The benchmark harnesses, at tiny settings: they still run, and the properties their ratios rest
on hold (LLaVA computes mm1's function, every variant does the same work, both generators emit
the same tokens). Speed itself is never asserted here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """`benchmarks.common` writing its worlds and results under tmp_path."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.common as common

    monkeypatch.setattr(common, "WORLDS", tmp_path / "worlds")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("MM1_BENCH_THREADS", "1")
    return common


def test_train_step_benchmark_compares_the_same_work(bench, monkeypatch) -> None:
    from benchmarks import train_step

    monkeypatch.setenv("MM1_BENCH_ATTENTION", "varlen")  # the grouped path on these short rows
    out = train_step.run(
        num_docs=12, seq_len=512, llava_batch=2, samples_per_variant=2, rounds=1, memory=False
    )
    assert out["settings"]["max_logit_difference_llava_vs_mm1"] < 1e-4
    variants = out["variants"]
    assert {v["tokens"] for v in variants.values()} == {out["settings"]["real_tokens"]}
    assert variants["llava_grouped"]["pad_efficiency"] >= variants["llava_plain"]["pad_efficiency"]
    assert variants["mm1_packed"]["pad_efficiency"] > 0.5
    assert (bench.RESULTS / "train_step.json").exists()


def test_generation_benchmark_emits_the_same_tokens_as_transformers(bench) -> None:
    from benchmarks import generation

    out = generation.run(batch_sizes=(2,), new_tokens=6, rounds=1)
    assert out["summary"]["all_tokens_identical"]
    assert out["summary"]["compiled_tokens_identical"]  # the compiled decode step: same tokens
    assert out["results"][0]["mm1_lengths"] == [6, 6]


def test_compile_blocks_wraps_every_block_of_both_models(bench) -> None:
    """`--compile` must compile the same blocks on both sides: each encoder and decoder layer."""
    import torch
    from benchmarks.models import build_llava, build_mm1, compile_blocks, small_config

    cfg = small_config(vocab_size=64, image_token_id=3)
    for model, lists in (
        (build_mm1(cfg), lambda m: [m.vision.blocks, m.decoder.layers]),
        (
            build_llava(cfg),
            lambda m: [m.model.vision_tower.encoder.layers, m.model.language_model.layers],
        ),
    ):
        compile_blocks(model)
        blocks = [b for layers in lists(model) for b in layers]
        assert len(blocks) == cfg.vision.layers + cfg.decoder.layers
        assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in blocks)


def test_committed_layouts_rebuild_the_tokenized_documents(bench, tmp_path) -> None:
    """The GPU side by side rebuilds documents from one-slot layouts: at any slot count they must
    have the lengths, image spans and targets that tokenizing at that count gives."""
    from benchmarks import doc_lengths
    from benchmarks.train_step import document_stream

    from mm1.data.tokenizer import Tokenizer

    path = doc_lengths.write(40, tmp_path / "layouts.json")
    world = bench.ensure_world(64)
    tok = Tokenizer.from_file(world.tokenizer_path)
    direct = document_stream(world, tok, 5, 40)
    rebuilt = doc_lengths.documents(5, tok.vocab_size, tok.image_id, path=path)
    assert len(rebuilt) == 40 and any(d.images for d in rebuilt)
    for a, b in zip(direct, rebuilt):
        assert (len(a), a.image_spans, a.target_mask, a.kind) == (
            len(b),
            b.image_spans,
            b.target_mask,
            b.kind,
        )
        image = [t == tok.image_id for t in b.input_ids]
        assert image == [t == tok.image_id for t in a.input_ids]


def test_document_attention_length_weights_documents_by_their_tokens(bench) -> None:
    import torch
    from benchmarks.gpu_bench import document_attention_length

    rows = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8])
    assert document_attention_length(rows) == pytest.approx((9 + 25 + 64) / 16)


def test_gpu_batch_defaults_fit_the_lent_devices(bench) -> None:
    """The GPU scripts size their batches by the device's memory (`total_memory` in GiB of an
    H200 and an H100): 4 training rows of 4,096 tokens on the H200 (measured 39.2 GiB at 1 row
    and 59.1 at 2 there) but 2 on the H100, where 4 would need about 99 GiB; LLaVA 8 samples
    per step on the H200 and 4 on the H100."""
    from benchmarks.gpu_bench import rows_that_fit
    from benchmarks.gpu_llava import samples_that_fit

    h200, h100 = 139.8, 79.2
    assert [rows_that_fit(h200, 4096), rows_that_fit(h100, 4096)] == [4, 2]
    assert rows_that_fit(h100, 2048) == 4 and rows_that_fit(20, 4096) == 1
    assert [samples_that_fit(h200), samples_that_fit(h100), samples_that_fit(40)] == [8, 4, 1]


def test_gpu_training_variant_halves_its_rows_after_running_out_of_memory(
    bench, monkeypatch
) -> None:
    import argparse

    import torch
    from benchmarks import gpu_bench

    tried, fits = [], 1

    def train_variant(args, **variant) -> dict:
        tried.append(args.micro_batch)
        if args.micro_batch > fits:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"status": "ok", "micro_batch": args.micro_batch, **variant}

    monkeypatch.setattr(gpu_bench, "train_variant", train_variant)
    out = gpu_bench.train_with_fallback(argparse.Namespace(micro_batch=4), compile_blocks=False)
    assert tried == [4, 2, 1]
    assert out == {
        "status": "ok",
        "micro_batch": 1,
        "compile_blocks": False,
        "micro_batch_out_of_memory": [4, 2],
    }
    fits = 0
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to halve
        gpu_bench.train_with_fallback(argparse.Namespace(micro_batch=2), compile_blocks=False)
    assert tried[3:] == [2, 1]


def test_gpu_side_by_side_runs_on_the_cpu(bench, tmp_path) -> None:
    """`gpu_llava.py --cpu-smoke`: same logits, identical fp32 tokens, the same real tokens in
    every training variant, and a partial result saved after each phase."""
    import argparse

    from benchmarks import gpu_llava

    args = argparse.Namespace(
        cpu_smoke=True,
        seq_len=256,
        llava_batch=0,  # the default: 8 on the CPU smoke
        num_docs=8,
        strata=1,
        rounds=1,
        new_tokens=4,
        decode=False,
    )
    saved = []
    out = gpu_llava.run(args, lambda payload: saved.append(dict(payload)))
    assert out["max_fp32_logit_difference"] < 1e-4 and out["llava_batch"] == 8
    # training ran first; generation starts again from the weights both models shared
    assert out["max_fp32_logit_difference_after_training"] < 1e-4
    assert out["summary"]["fp32_tokens_identical"]
    assert len({v["tokens"] for v in out["training"].values()}) == 1
    assert set(out["summary"]["train_tokens_per_s_ratio"]) == {
        "vs_llava_grouped",
        "vs_llava_plain",
    }
    assert [s["status"] for s in saved] == ["partial"] * 5

    # gpu.sh's `decode` variant: generation only, mm1 compiled beside mm1 eager and HF, saved
    # after each batch size; in fp32 the compiled tokens are eager mm1's, which are HF's.
    saved.clear()
    out = gpu_llava.run(
        argparse.Namespace(**{**vars(args), "decode": True}),
        lambda payload: saved.append(dict(payload)),
    )
    assert out["status"] == "ok" and out["training"] == {}
    assert [g["batch"] for g in out["generation"]] == [1, 2]
    for g in out["generation"]:
        assert g["identical_tokens"] == 1.0
        assert g["compiled_first_divergence_from_eager"] == [None] * g["batch"]
        assert g["compiled_ratio"] > 0 and g["compiled_warmup_s"] > 0
    assert [len(s["generation"]) for s in saved if "generation" in s][-2:] == [1, 2]


def test_gpu_side_by_side_casts_each_model_as_its_library_loads_bf16(bench, tmp_path) -> None:
    """`cast_as_loaded` (the bf16 generation of `gpu_llava.py`) gives LLaVA exactly what
    transformers' `from_pretrained(dtype=bfloat16)` gives, and mm1 the same logits: rotary
    frequencies stay fp32. `.to(bfloat16)`, which the script did before, rounds them too and
    moves the logits."""
    import copy

    import torch
    from benchmarks.models import build_mm1, cast_as_loaded, llava_from_mm1, small_config
    from transformers import LlavaForConditionalGeneration

    cfg = small_config(512, 511)
    mm1 = build_mm1(cfg).eval()
    llava = llava_from_mm1(mm1).eval()
    llava.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    rounded = copy.deepcopy(mm1).to(torch.bfloat16)
    for net in (mm1, llava):
        cast_as_loaded(net, torch.bfloat16)
    assert mm1.decoder.embed_tokens.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 510, (30,), generator=g)
    ids = torch.cat([torch.full((cfg.num_image_tokens,), cfg.resolved_image_token_id), text])
    px = torch.randn(1, 3, 64, 64, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        ours = mm1(ids[None], pixel_values=px).logits
        theirs = llava(input_ids=ids[None], pixel_values=px).logits
        hf = loaded(input_ids=ids[None], pixel_values=px).logits
        old = rounded(ids[None], pixel_values=px).logits
    assert ours.dtype == torch.bfloat16 and torch.equal(theirs, hf) and torch.equal(ours, hf)
    assert not torch.equal(old, ours)


def test_sft_memory_benchmark_builds_each_file_once_per_worker(bench, tmp_path) -> None:
    """Two loader workers over one JSON list: one index build in each worker, none in the
    loader's process; the gzipped copy is parsed once in each; the JSONL copy is streamed."""
    from benchmarks import sft_memory

    js, gz, jl = sft_memory.write_data(tmp_path / "sft", records=300)
    assert js.read_text().count('"id"') == len(jl.read_text().splitlines()) == 300
    assert gzip.decompress(gz.read_bytes()) == js.read_bytes()
    out = sft_memory.measure(js, batches=3, workers=2)
    assert out["builds_per_process"] == [1, 1]
    # Memory is sampled every 0.25 s, so short-lived workers may be missed: only the parent is
    # certain to be seen (the figures themselves are the benchmark's, not this test's).
    assert out["peak_rss_per_process_mib"] and out["peak_rss_tree_mib"] > 0
    assert sft_memory.measure(gz, batches=3, workers=2)["builds_per_process"] == [1, 1]
    assert sft_memory.measure(jl, batches=3, workers=2)["builds_per_process"] == []


def test_moe_layer_benchmark_compares_the_same_function(bench) -> None:
    from benchmarks import moe_layer

    out = moe_layer.run(dim=32, ffn=64, tokens=64, experts=(4,), rounds=1, loop_tokens=8)
    (r,) = out["results"]
    assert r["max_difference_grouped_vs_per_expert"] < 1e-5
    assert r["max_difference_grouped_vs_token_loop"] < 1e-5
    # the dense comparison has the experts' active parameters (the router is the MoE's own)
    assert r["active_parameters_moe"] == r["parameters_dense"] + 32 * 4
    assert set(r["seconds"]) == {"moe_grouped", "moe_per_expert", "dense", "token_loop"}
    assert all(v > 0 for v in r["seconds"].values()) and r["token_loop_over_moe"] > 0
    # CPU seconds of each variant's best round (tick-grained: 0 is possible at this size)
    assert set(r["cpu_user_seconds"]) == set(r["cpu_system_seconds"]) == set(r["seconds"])
    assert all(v >= 0 for v in r["cpu_user_seconds"].values())
    assert "moe_over_dense_user_cpu" in r
    assert (bench.RESULTS / "moe_layer.json").exists()
    # a subset (E=64 at full width leaves the token loop out): the rest is None
    out = moe_layer.run(
        dim=32, ffn=64, tokens=64, experts=(4,), rounds=1, variants=("moe_grouped", "dense")
    )
    (r,) = out["results"]
    assert r["seconds"]["token_loop"] is None and r["token_loop_over_moe"] is None
    assert r["seconds"]["moe_per_expert"] is None and r["per_expert_over_grouped"] is None
    assert r["moe_over_dense"] > 0 and out["settings"]["variants"] == ["moe_grouped", "dense"]
    with pytest.raises(ValueError, match="--loop-tokens"):
        moe_layer.run(dim=32, ffn=64, tokens=64, experts=(4,), rounds=1, loop_tokens=0)


def test_moe_layer_benchmark_in_the_gpu_scripts_layout(bench, tmp_path) -> None:
    """gpu.sh's `moe` variant: OUT/moe.json with a status, in bf16 where asked (here on the
    CPU), the same function on every path."""
    from benchmarks import moe_layer

    out = moe_layer.run(
        dim=32,
        ffn=64,
        tokens=64,
        experts=(4,),
        rounds=1,
        loop_tokens=8,
        dtype="bf16",
        out_dir=str(tmp_path),
    )
    saved = json.loads((tmp_path / "moe.json").read_text())
    assert saved["variant"] == "moe" and saved["status"] == "ok"
    assert saved["settings"]["dtype"] == "bf16"
    # as JSON: a ratio over a CPU time too short to register is nan, which equals nothing
    assert json.dumps(saved["results"]) == json.dumps(out["results"])
    (r,) = saved["results"]
    assert r["max_difference_grouped_vs_per_expert"] < 1e-2  # bf16


def test_eval_throughput_benchmark_compiled_predicts_as_eager(bench) -> None:
    """`eval_throughput --compile`: each batch size again with eval.compile, the same
    predictions as eager decoding at that batch size."""
    from benchmarks import eval_throughput

    out = eval_throughput.main(
        ["--examples", "4", "--shots", "2", "--batch-sizes", "1,2", "--compile"]
    )
    rows = out["results"]
    assert [(r["batch_size"], r["compile"]) for r in rows] == [
        (1, False),
        (2, False),
        (1, True),
        (2, True),
    ]
    for r in rows[2:]:
        assert r["same_predictions_as_eager"] == 1.0 and r["speedup_vs_eager"] > 0


def test_load_memory_benchmark_reads_bf16_without_a_whole_fp32_copy(bench, tmp_path) -> None:
    """`--dtype bf16` allocates the bf16 weights once (plus ~10 MiB of the load's own); the
    way before it (load in fp32, then `.to(bf16)`) allocated the fp32 model first. A training
    start holds its starting weights once."""
    from benchmarks import load_memory

    paths = load_memory.write_models(tmp_path / "models", dim=384, layers=2, vision_layers=2)

    def load(source: str, dtype: str, cast: str = "0") -> dict:
        args = ["--child", str(paths[source]), dtype, cast]
        return bench.run_child("benchmarks.load_memory", args)

    before = load("llava_bf16", "float32", cast="1")
    bf16 = load("llava_bf16", "bfloat16")
    export = load("export_fp32", "bfloat16")  # an fp32 export: each tensor cast as it is read
    weights = pytest.approx(bf16["weights_mib"], rel=1e-3)  # `.to` casts the rotary too
    assert before["weights_mib"] == weights and export["weights_mib"] == weights
    assert before["peak_anon_added_mib"] > 2 * bf16["weights_mib"]  # 97 MiB for 43
    assert bf16["peak_anon_added_mib"] < 0.7 * before["peak_anon_added_mib"]  # 53
    assert export["peak_anon_added_mib"] < 0.7 * before["peak_anon_added_mib"]  # 44
    # a run's DCP checkpoint: each weight cast as it is read in, so bf16 peaks the bf16
    # weights lower than fp32 does, beyond the same ~12 MiB of DCP's own (the way before read
    # the fp32 model first: no lower). Counted as the bytes malloc handed out, not RSS, which
    # also holds freed memory malloc keeps and mapped file pages: RSS measured the saving at
    # 42-55 MiB in lone runs and 31.5 in a fresh clone's full suite; malloc's count, 43.4 in
    # every run (the bf16 weights' 43.39).
    run, run_fp32 = load("run_fp32", "bfloat16"), load("run_fp32", "float32")
    assert run["weights_mib"] == weights
    saved = run_fp32["peak_heap_added_mib"] - run["peak_heap_added_mib"]
    assert saved > 0.8 * bf16["weights_mib"]
    # a training run's start (fp32) from the LLaVA directory: the starting weights once,
    # where a random model with them copied in held two copies
    start, random_first = (
        load("llava_bf16", "float32", "train"),
        load("llava_bf16", "float32", "train_random_init"),
    )
    fp32 = pytest.approx(2 * bf16["weights_mib"], rel=1e-2)
    assert start["weights_mib"] == random_first["weights_mib"] == fp32
    assert random_first["peak_anon_added_mib"] > 1.8 * start["weights_mib"]
    assert start["peak_anon_added_mib"] < 1.2 * start["weights_mib"]
