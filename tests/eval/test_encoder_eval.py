"""Encoder evaluation: retrieval recall and zero-shot tasks on constructed inputs, the
linear probe's optimality and accuracy, and `mm1 eval-encoder` end to end on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mm1.eval.encoders import retrieval_recall, zero_shot_tasks
from mm1.eval.linear_probe import fit_logistic, probe_accuracy


def test_retrieval_recall_on_known_rankings() -> None:
    images = torch.eye(4)
    # captions 0, 1 belong to image 0; caption 2 to image 1 (but looks like image 2); 3 to 3
    captions = torch.stack([images[0], images[0] * 0.9 + images[1] * 0.1, images[2], images[3]])
    owner = [0, 0, 1, 3]
    r = retrieval_recall(images, F.normalize(captions, dim=-1), owner)
    # text -> image: captions 0, 1, 3 find their image first; caption 2 finds image 2 first
    assert r["text_to_image_r1"] == pytest.approx(3 / 4)
    assert r["text_to_image_r5"] == 1.0
    # image -> text: images 0 and 3 rank an own caption first; 1 and 2 do not
    assert r["image_to_text_r1"] == pytest.approx(2 / 4)
    assert r["text_to_image_r1_chance"] == pytest.approx(1 / 4)


def test_zero_shot_tasks_label_single_valued_scenes_only() -> None:
    def obj(color: str, shape: str) -> dict[str, str]:
        return {"color": color, "shape": shape}

    scenes = [
        {"count": 2, "objects": [obj("red", "circle"), obj("red", "star")]},
        {"count": 2, "objects": [obj("red", "star"), obj("blue", "star")]},
        {"count": 0, "objects": []},
    ]
    colour, shape, count = zero_shot_tasks(scenes)
    assert colour.rows == [0] and colour.classes[colour.labels[0]] == "red"
    assert shape.rows == [1] and shape.classes[shape.labels[0]] == "star"
    assert count.rows == [0, 1] and count.classes == ["2"]
    assert "a red circle" in colour.prompts[colour.classes.index("red")]
    assert "two shapes on a gray background" in count.prompts[0]


def test_linear_probe_reaches_the_optimum_and_separates_separable_classes() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)  # 3 linearly separable classes
    w, b, mean, std = fit_logistic(x, y, 3, l2=1e-3)
    # the optimum: the objective's gradient vanishes there
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    z = (x.double() - mean) / std
    loss = F.cross_entropy(z @ w + b, y) + 1e-3 * w.pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
    assert probe_accuracy(x[:200], y[:200], x[200:], y[200:], 3) > 0.9
    noise = torch.randint(0, 3, (300,), generator=g)  # labels unrelated to the features
    assert probe_accuracy(x[:200], noise[:200], x[200:], noise[200:], 3) < 0.6


def test_eval_encoder_cli_scores_a_clip_run(
    tmp_path: Path, monkeypatch, capsys, world_copy
) -> None:
    from mm1 import cli

    tiny_world = world_copy(tmp_path / "world")

    cfg = {
        "model": {
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
                       "mlp_dim": 64},
            "connector": {"type": "avgpool", "num_tokens": 4},
        },
        "data": {"world": str(tiny_world), "num_workers": 0},
        "encoder": {"text": {"width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
                    "clip": {"embed_dim": 16}},
        "train": {"run_dir": str(tmp_path / "run"), "steps": 1, "batch_size": 4,
                  "micro_batch_size": 4, "parallel": "none", "val_every": 0, "save_every": 1,
                  "tensorboard": False, "progress": False, "optim": {"lr": 1e-3}},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train-encoder", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    assert cli.main(["eval-encoder", str(run), "--probe-seeds", "2"]) == 0
    result = json.loads((run / "eval" / "encoder_eval.json").read_text())
    assert set(result["zero_shot"]) == {"colour", "shape", "count"}
    assert 0.0 <= result["retrieval"]["text_to_image_r10"] <= 1.0
    assert len(result["linear_probe"]["count"]["per_seed"]) == 2
    assert "| colour |" in (run / "eval" / "encoder_eval.md").read_text()
    assert cli.main(["eval-encoder", str(run), "--untrained-seed", "0", "--probe-seeds", "2"]) == 0
    assert (run / "eval" / "encoder_eval_untrained0.json").is_file()
    assert result["world"] == str(tiny_world.resolve())  # which world it scored on

    # A checkpoint finds its run's world from anywhere (not ./data/world), and its scores go
    # to the run's eval folder, which outlives the checkpoint's rotation.
    elsewhere = tmp_path / "elsewhere"
    world_copy(elsewhere / "data" / "world", seed=1)
    monkeypatch.chdir(elsewhere)
    step = run / "checkpoints" / "step_1"
    assert cli.main(["eval-encoder", str(step), "--probe-seeds", "1"]) == 0
    result = json.loads((run / "eval" / "step_1" / "encoder_eval.json").read_text())
    assert result["world"] == str(tiny_world.resolve()) and not (step / "eval").exists()

    # An encoder run where an MM1 model is expected: one line, not hundreds of state_dict keys.
    capsys.readouterr()
    refused = (
        f"config error: {run} is an image-encoder run (mm1 train-encoder), not an MM1 model; "
        "use it as train.init.vision or evaluate it with mm1 eval-encoder"
    )
    for argv in (
        ["generate", str(run), "--prompt", "x"],
        ["chat", str(run), "--message", "x"],
        ["eval", str(run), "--out", str(tmp_path / "e")],
        ["eval", str(run), "--suite", "sft", "--out", str(tmp_path / "e")],
    ):
        assert cli.main(argv) == 2, argv
        assert " ".join(capsys.readouterr().out.split()) == refused, argv
    assert not (tmp_path / "e").exists()  # refused before anything was written

    assert cli.main(["eval-encoder", str(run), "--probe-seeds", "0"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert out == "config error: --probe-seeds 0 must be >= 1 (linear-probe splits)"
    assert cli.main(["eval-encoder", str(run), "--device", "meta"]) == 2
    assert "--device meta" in capsys.readouterr().out


def test_an_encoder_runs_where_placed_and_its_scores_come_back_in_fp32() -> None:
    """`Placement.batched` (`eval-encoder --device --dtype`): the encoder's batches in its
    dtype, what comes back fp32 on the CPU (codes stay integers), and bf16 features close to
    fp32's."""
    import torch

    from mm1.eval.encoders import Placement

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(10, 8)
    full = Placement().batched(net, 10, 3, x)
    low = Placement(torch.device("cpu"), torch.bfloat16)
    seen: list[torch.dtype] = []
    half = low.batched(lambda a: seen.append(a.dtype) or net.bfloat16()(a), 10, 3, x)
    assert seen == [torch.bfloat16] * 4 and half.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(full, half, dim=-1)
    assert cos.min() > 0.99 and not torch.equal(full, half)
    codes = low.batched(lambda a: a.argmax(-1), 10, 4, x)
    assert codes.dtype == torch.long and torch.equal(codes, x.argmax(-1))
