"""The benchmark harnesses, at tiny settings: they still run, and the properties their ratios rest
on hold (LLaVA computes mm1's function, every variant does the same work, both generators emit
the same tokens). Speed itself is never asserted here."""

from __future__ import annotations

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
