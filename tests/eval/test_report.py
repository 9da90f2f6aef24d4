"""Reports: results.json, the paper-style markdown table and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm1.config import ConnectorConfig, DecoderConfig, EvalConfig, ModelConfig, VisionConfig
from mm1.data.images import ImageProcessor
from mm1.data.tokenizer import Tokenizer
from mm1.eval.fewshot import evaluate
from mm1.eval.report import compare_runs, markdown_table, write_report
from mm1.models.mllm import MM1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_results(name: str, base: float, shuffle: bool = False) -> dict:
    """Hand-made results in evaluate()'s layout, with numbers easy to find in the table."""

    def cell(scores: list[float]) -> dict:
        mean = sum(scores) / len(scores)
        std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
        return {
            "scores": scores,
            "seeds": list(range(len(scores))),
            "mean": mean,
            "std": std,
            "text_demos": False,
        }

    tasks = {
        "coco": {
            "kind": "caption",
            "metric": "CIDEr",
            "num_queries": 5,
            "total_queries": 5,
            "subset": False,
            "zero_shot_plain": None,
            "shots": {
                "0": cell([base + 10.0, base + 12.0]),
                "4": cell([base + 40.0, base + 42.0]),
                "8": cell([base + 50.0, base + 54.0]),
            },
        },
        "vqav2": {
            "kind": "vqa",
            "metric": "VQA accuracy",
            "num_queries": 9,
            "total_queries": 90,
            "subset": True,
            "zero_shot_plain": {"scores": [1.5], "mean": 1.5, "std": 0.0},
            "shots": {
                "0": cell([base + 30.0] * 2),
                "4": cell([base + 33.0] * 2),
                "8": cell([base + 36.0] * 2),
            },
        },
    }
    tasks["vqav2"]["shots"]["0"]["text_demos"] = True
    avg = {
        k: (tasks["coco"]["shots"][k]["mean"] + tasks["vqav2"]["shots"][k]["mean"]) / 2
        for k in ("0", "4", "8")
    }
    avg["overall"] = sum(avg.values()) / 3
    rec = {
        "id": "7",
        "image_id": "7",
        "image": "/x/7.jpg",
        "query_image": "/x/7.jpg",
        "question": "What color?",
        "prediction": "red | blue",
        "raw": "red | blue\n",
        "references": ["red"] * 10,
        "demos": [],
        "score": 100.0,
    }
    return {
        "name": name,
        "config": {
            "shots": [0, 4, 8],
            "seeds": [0, 1],
            "demo_selection": "random",
            "zero_shot_text_demos": True,
            "zero_shot_text_demo_count": 2,
            "decoding": "greedy",
            "max_new_tokens": {"caption": 20, "vqa": 5},
            "max_examples": 9,
            "shuffle_images": shuffle,
        },
        "tasks": tasks,
        "average": avg,
        "predictions": {"vqav2": {"8": {"0": [rec]}}},
        "timing": {"seconds": 1.25, "generations": 42},
    }


def test_markdown_table_is_laid_out_like_the_paper() -> None:
    a, b = fake_results("MM1-tiny", 0.0), fake_results("MM1-tiny", 5.0, shuffle=True)
    table = markdown_table({"run A": a, "run B": b})
    lines = table.splitlines()
    assert lines[0] == (
        "| Run | coco 0-shot | coco 4-shot | coco 8-shot | vqav2 0-shot | vqav2 4-shot | vqav2 8-shot "
        "| Avg 0-shot | Avg 4-shot | Avg 8-shot | Avg all |"
    )
    assert (
        lines[2]
        == "| run A | 11.0 | 41.0 | 52.0 | 30.0 | 33.0 | 36.0 | 20.5 | 37.0 | 44.0 | 33.8 |"
    )
    assert lines[3].startswith("| run B | 16.0 | 46.0 | 57.0 | 35.0 |")
    # a list of results is named by the runs themselves; the control says so
    assert "| MM1-tiny (shuffled images) |" in markdown_table([a, b])


def test_write_report(tmp_path: Path) -> None:
    a, b = fake_results("MM1-tiny", 0.0), fake_results("MM1-tiny", -5.0, shuffle=True)
    paths = write_report({"model": a, "shuffled control": b}, tmp_path / "rep", "Tiny few-shot")
    assert json.loads(paths["json"].read_text())["model"]["average"]["overall"] == pytest.approx(
        a["average"]["overall"]
    )
    md = paths["markdown"].read_text()
    assert md.startswith("# Tiny few-shot")
    assert "| model | 11.0 | 41.0 | 52.0 | 30.0 | 33.0 | 36.0 | 20.5 | 37.0 | 44.0 | 33.8 |" in md
    assert (
        "| coco | CIDEr | 5 | 11.00 ± 1.00 (n=2) | 41.00 ± 1.00 (n=2) | 52.00 ± 2.00 (n=2) | – |"
        in md
    )
    assert "| vqav2 | VQA accuracy | 9 of 90 |" in md and "| 1.50 |" in md  # subset, plain 0-shot
    assert "only the first 9 queries" in md
    assert "red \\| blue" in md  # predictions cannot break the table
    assert "shuffled images (control): yes" in md
    png = paths["plot"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    # one run alone: results.json is that run's dict
    single = write_report(a, tmp_path / "one")
    assert json.loads(single["json"].read_text())["name"] == "MM1-tiny"
    assert "| MM1-tiny | 11.0 |" in single["markdown"].read_text()


def test_compare_runs(tmp_path: Path) -> None:
    runs = [fake_results(f"run{i}", 3.0 * i) for i in range(3)]
    out = compare_runs(runs, ["small", "medium", "large"], tmp_path / "cmp" / "compare.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="names"):
        compare_runs(runs, ["only one"], tmp_path / "x.png")


def test_report_of_a_real_evaluation(
    tmp_path_factory: pytest.TempPathFactory, world_copy, tmp_path: Path
) -> None:
    world = world_copy(tmp_path_factory.mktemp("world"))
    tok = Tokenizer.from_file(world / "tokenizer.json")
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act="gelu"
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=4),
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64
        ),
        image_token_id=tok.image_id,
    )
    torch.manual_seed(0)
    model = MM1(cfg).eval()
    r = evaluate(
        model,
        tok,
        ImageProcessor.clip(32),
        EvalConfig(shots=[0, 2], seeds=1, max_examples=4, max_new_tokens=4),
        tasks=["synth_coco", "synth_vqa"],
        world=world,
        progress=False,
        name="random init",
    )
    paths = write_report(r, tmp_path, "Random tiny model")
    md = paths["markdown"].read_text()
    score = r["tasks"]["synth_coco"]["shots"]["2"]["mean"]
    assert (
        f"| random init | {r['tasks']['synth_coco']['shots']['0']['mean']:.1f} | {score:.1f} |"
        in md
    )
    assert json.loads(paths["json"].read_text())["tasks"]["synth_vqa"]["num_queries"] == 4
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)
