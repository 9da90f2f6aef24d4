"""Few-shot evaluation with a tiled image layout: every image's slots follow its size, only the
last `high_res_last` images are tiled, and the evaluator's generations are those of the model
on the same prompt written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mm1.config import (
    ConnectorConfig,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    ImageLayoutConfig,
    ModelConfig,
    VisionConfig,
)
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import Tokenizer, tokenize_prompt
from mm1.eval.fewshot import FewShotEvaluator, evaluate
from mm1.eval.prompts import high_res_flags
from mm1.eval.tasks import load_task
from mm1.models.generation import generate
from mm1.models.mllm import MM1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, world_copy) -> Path:
    root = world_copy(tmp_path_factory.mktemp("world"))
    return root


def _anyres_model(tok: Tokenizer) -> MM1:
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64, act="gelu"
        ),
        connector=ConnectorConfig(type="mlp", num_tokens=0),
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size, dim=32, layers=1, heads=4, kv_heads=2, ffn_dim=64
        ),
        image_token_id=tok.image_id,
        image_layout=ImageLayoutConfig(type="anyres", grid=[1, 2]),
    )
    torch.manual_seed(0)
    return MM1(cfg).eval()


def test_few_shot_prompts_tile_only_the_last_images(world: Path) -> None:
    tok = Tokenizer.from_file(world / "tokenizer.json")
    model = _anyres_model(tok)
    fmt = PromptFormat.from_config(DataConfig(), model.num_image_tokens, model.cfg)
    proc = ImageProcessor.clip(16)
    cfg = EvalConfig(shots=[2], seeds=1, max_examples=3, vqa_max_new_tokens=3, high_res_last=1)
    cfg.zero_shot_text_demos = False
    r = evaluate(
        model,
        tok,
        proc,
        cfg,
        tasks=["synth_vqa"],
        world=world,
        prompt_format=fmt,
        keep_prompts=True,
        progress=False,
    )
    task = load_task("synth_vqa", world=world)
    support = {e.id: e for e in task.support}
    evaluator = FewShotEvaluator(model, tok, proc, prompt_format=fmt, high_res_last=1)
    for rec in r["predictions"]["synth_vqa"]["2"]["0"]:
        paths = [support[d].image for d in rec["demos"]] + [Path(rec["image"])]
        images = [Image.open(p).convert("RGB") for p in paths]
        flags = high_res_flags(len(images), 1)
        assert flags == [False, False, True]
        ids = tokenize_prompt(rec["prompt"], images, tok, fmt, flags)
        assert rec["prompt_tokens"] == len(ids)
        slots = ids.count(tok.image_id)
        assert slots == 2 * model.num_image_tokens + fmt.slots(images[-1])
        assert fmt.crops(images[-1]) > 1  # the query really is tiled
        pixels = fmt.pixel_values(proc, images, flags)
        crops, sizes = fmt.image_info(images, flags)
        out = generate(
            model,
            [ids],
            pixels,
            max_new_tokens=3,
            eos_token_id=sorted(evaluator.stop_ids),
            pad_token_id=tok.pad_id,
            stop_strings=evaluator.text_stops,
            tokenizer=tok,
            image_crops=crops,
            image_sizes=sizes,
        )[0]
        assert rec["raw"] == tok.decode(out, skip_special_tokens=False)


def test_high_res_flags() -> None:
    assert high_res_flags(3, 0) == [True] * 3
    assert high_res_flags(3, 2) == [False, True, True]
    assert high_res_flags(1, 4) == [True]


def test_sft_suite_runs_a_tiled_layout_batched_as_alone(world: Path) -> None:
    """The SFT suite gives a tiled model each image's crop count and size: anyres prompts with
    one and with several pictures are answered, and a batch answers as each query alone."""
    from mm1.data.sft_eval import ensure_sft_eval
    from mm1.eval.suite import evaluate_suite
    from mm1.eval.suite_tasks import load_suite

    ensure_sft_eval(world)
    tasks = [t for t in load_suite(world / "eval" / "sft" / "suite.yaml") if t.kind == "multi"]
    tok = Tokenizer.from_file(world / "tokenizer.json")
    model = _anyres_model(tok)
    fmt = PromptFormat.from_config(DataConfig(), model.num_image_tokens, model.cfg)
    proc = ImageProcessor.clip(16)
    common = {"chat": False, "shots": 1, "seeds": 1, "max_examples": 3}
    batched = evaluate_suite(model, tok, proc, fmt, tasks, batch_size=3, **common)
    alone = evaluate_suite(model, tok, proc, fmt, tasks, batch_size=1, **common)
    records = batched["predictions"]["sft_multi"]["0"]
    assert [r["prediction"] for r in records] == [
        r["prediction"] for r in alone["predictions"]["sft_multi"]["0"]
    ]
    image = Image.open(tasks[0].query[0].images[0]).convert("RGB")
    assert fmt.crops(image) > 1  # the pictures really are tiled
