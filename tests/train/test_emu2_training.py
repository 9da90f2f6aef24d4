"""`model.family: emu2` end to end from the CLI: training with the image regression beside the
text loss, caption-first pairs, `mm1 eval-generation`, MM1 runs as starting points (and back),
and FSDP2 on two processes resuming bit-exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.train.run_configs import logged

EMU2 = ["model.family=emu2", "data.image_boundaries=true", "data.caption_first=0.5"]


def test_an_emu2_run_trains_both_losses_and_scores_its_generated_features(
    tmp_path, world, tiny_config
) -> None:
    from mm1 import cli
    from mm1.data.document import Document
    from mm1.data.tokenizer import tokenize_document
    from mm1.eval.image_generation import generation_prompt
    from mm1.models.emu2 import Emu2
    from mm1.pretrained import load_pretrained

    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=2)
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *EMU2]) == 0
    loss, aux = logged(run, "loss"), logged(run, "aux_loss_image_regression")
    total = logged(run, "loss_total")
    assert sorted(aux) == [1, 2] and all(v > 0 for v in aux.values())
    for step in (1, 2):  # weight 1 by default: the objective is their sum
        assert total[step] == pytest.approx(loss[step] + aux[step], rel=1e-6)

    p = load_pretrained(run)
    assert isinstance(p.model, Emu2) and p.image_boundaries
    # the generation prompt is a caption-first pair as training tokenizes it, up to its slots
    doc = Document("x", "captions", ["a red circle", Image.new("RGB", (40, 30))])
    ids = tokenize_document(doc, p.tokenizer, p.prompt_format).input_ids
    prompt = generation_prompt(p, "a red circle")
    assert ids[: len(prompt)] == prompt and ids[len(prompt)] == p.tokenizer.image_id
    assert prompt[-1] == p.tokenizer.boi_id

    out = tmp_path / "gen"
    args = ["eval-generation", str(run), "--max-images", "12", "--out", str(out)]
    assert cli.main(args) == 0
    result = json.loads((out / "image_generation.json").read_text())
    assert result["images"] == 12 and result["captions"] >= 12
    r = result["text_to_image"]
    assert r["text_to_image_r1_chance"] == pytest.approx(1 / 12)
    assert 0 <= r["text_to_image_r1"] <= r["text_to_image_r5"] <= 1
    assert "| text -> image |" in (out / "image_generation.md").read_text()
    assert len(result["examples"]) == 6 and len(result["examples"][0]["nearest"]) == 4
    assert (out / "image_generation.png").stat().st_size > 0
    # in bf16: the regressed features scored as in fp32 (up to rounding), and said
    low = tmp_path / "bf16"
    assert cli.main([*args[:-1], str(low), "--dtype", "bf16"]) == 0
    in_bf16 = json.loads((low / "image_generation.json").read_text())
    assert in_bf16["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    assert in_bf16["cosine_own"] == pytest.approx(result["cosine_own"], abs=0.05)
    assert cli.main([*args, "--guidance-scale", "2"]) != 0  # features are regressed, not drawn

    # the same scores as a study's `generation` suite, and its table in a study's report
    from mm1.ablate.cell import SUITES
    from mm1.ablate.results import tables

    metrics = SUITES["generation"](run, ["eval.max_examples=12"])
    assert metrics["generation/r1"] == r["text_to_image_r1"]
    assert set(metrics) >= {"generation/r1_chance", "generation/cosine_own", "generation/l1"}
    stats = {k: {"mean": v, "std": 0.0, "n": 1} for k, v in metrics.items()}
    config = {"settings": {"model.family": "emu2"}, "metrics": stats, "seeds": {}}
    report = "\n".join(tables({"table": {}, "configs": [config]}))
    assert "### generation" in report and "| family | r1 | r1_chance | r5 |" in report


def test_eval_generation_refuses_a_model_that_generates_no_images(
    tmp_path, world, tiny_config, capsys
) -> None:
    from mm1 import cli

    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, world, steps=1, save_every=1, parallel="none", val_every=0)
    assert cli.main(["train", str(cfg), f"train.run_dir={run}"]) == 0
    capsys.readouterr()
    assert cli.main(["eval-generation", str(run), "--out", str(tmp_path / "gen")]) != 0
    err = "".join(capsys.readouterr())
    assert "model.family=mm1 generates no images (model.family=emu2, chameleon and seed do)" in err
    assert cli.main(["eval-generation", str(run), "--captions", "c.json"]) != 0
    assert "--captions and --image-dir go together" in "".join(capsys.readouterr())
    assert cli.main(["eval-generation", str(run), "--top-k", "5"]) != 0
    assert "--top-k samples, which needs --temperature > 0" in "".join(capsys.readouterr())
    assert cli.main(["eval-generation", str(run), "--guidance-scale", "inf"]) != 0
    assert "--guidance-scale inf: a number (1: no guidance)" in "".join(capsys.readouterr())
    assert cli.main(["eval-generation", str(run), "--guidance-scale", "2"]) != 0
    assert "model.family=mm1 generates no images" in "".join(capsys.readouterr())


def test_an_mm1_run_starts_an_emu2_model_and_back(tmp_path, world, tiny_config) -> None:
    """Emu2's encoder and connector are MM1's, key for key: an MM1 run starts every part of an
    emu2 model (the regression head starts fresh), and an emu2 run an MM1 model."""
    from mm1 import cli
    from mm1.checkpoint import read_model_weights
    from mm1.config import InitConfig
    from mm1.models.emu2 import Emu2
    from mm1.models.starting_point import expected_shapes, starting_state

    run = tmp_path / "mm1"
    cfg = tiny_config(tmp_path, world, steps=1, save_every=1, parallel="none", val_every=0)
    assert cli.main(["train", str(cfg), f"train.run_dir={run}"]) == 0
    saved_run = read_model_weights(run)
    saved, model_cfg = saved_run.state, dataclasses.replace(saved_run.config, family="emu2")
    emu2 = Emu2(model_cfg)
    state = starting_state(InitConfig(weights=str(run)), model_cfg, expected_shapes(emu2))
    assert set(state) == set(saved) and not any(k.startswith("regress.") for k in state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    back = tmp_path / "back"
    start = [f"train.init.weights={run}", "model.family=emu2"]
    assert cli.main(["train", str(cfg), f"train.run_dir={back}", *start]) == 0
    again = [f"train.run_dir={tmp_path / 'again'}", f"train.init.weights={back}"]
    assert cli.main(["train", str(cfg), *again]) == 0
    # an emu2 run starts another emu2 model with its head (a later stage keeps what it learned)
    trained = read_model_weights(back).state
    state = starting_state(InitConfig(weights=str(back)), model_cfg, expected_shapes(emu2))
    assert all(torch.equal(state[k], trained[k]) for k in ("regress.weight", "regress.bias"))


def test_two_process_fsdp_emu2_run_resumes_bit_exactly(
    tmp_path: Path, world, tiny_config, two_process_run_and_resume
) -> None:
    """2 gloo processes, FSDP2: a run resumed from its step-2 checkpoint logs the uninterrupted
    run's losses (the regression's included) and ends with its weights; caption-first draws
    and text-only micro-batches (a zero regression that still reaches the head) included."""
    from mm1.checkpoint import read_model_weights

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="fsdp", val_every=0)
    full, resumed = two_process_run_and_resume(tmp_path, cfg, EMU2)
    for key in ("loss", "aux_loss_image_regression"):
        assert sorted(logged(full, key)) == [1, 2, 3, 4]
        assert logged(resumed, key) == logged(full, key)  # bit-exact on CPU
    a, b = read_model_weights(full).state, read_model_weights(resumed).state
    assert "regress.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
