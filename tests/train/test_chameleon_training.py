"""`model.family: chameleon` end to end from the CLI: a VQ tokenizer trained by `mm1
train-encoder` (resuming exactly, scored by `mm1 eval-encoder`), read by a chameleon run that
trains the image codes' cross-entropy beside the text's with the tokenizer frozen, starts its
decoder from an MM1 run, scores its generated images, and resumes bit-exactly on two FSDP2
processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError
from tests.train.run_configs import logged

# A 32 px image, 16x down: 2 x 2 codes of a 16-code book.
VQ = [
    "model.family=chameleon",
    "model.vq.channels=[8,8,8,8]",
    "model.vq.codebook_size=16",
    "model.vq.code_dim=4",
]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, world) -> Path:
    """A VQ tokenizer run of 4 steps (its checkpoint at step 4), and the same run resumed from
    step 2 beside it."""
    from mm1.config.encoder import load_encoder_config
    from mm1.train.encoder_trainer import EncoderTrainer
    from tests.train.run_configs import encoder_config

    tmp = tmp_path_factory.mktemp("vq")
    cfg = encoder_config(tmp, world, "vq")
    straight, split = tmp / "straight", tmp / "split"
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={straight}", *VQ])).fit()
    first = load_encoder_config(cfg, [f"train.run_dir={split}", "train.steps=2", *VQ])
    assert EncoderTrainer(first).fit()["step"] == 2
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={split}", *VQ])).fit()
    return straight


def test_a_vq_tokenizer_run_resumes_exactly_and_is_scored(tokenizer_run: Path, capsys) -> None:
    """The codebook's EMA state and its restarts (random draws of each step's stream) resume
    with the weights: the resumed run logs the uninterrupted one's losses and ends with its
    codebook. `mm1 eval-encoder` scores its reconstructions; `export-encoder` refuses it."""
    from mm1 import cli
    from mm1.checkpoint import read_model_weights

    split = tokenizer_run.parent / "split"
    assert logged(split, "loss") == logged(tokenizer_run, "loss")
    assert sorted(logged(tokenizer_run, "codes_restarted")) == [1, 2, 3, 4]
    a, b = read_model_weights(tokenizer_run).state, read_model_weights(split).state
    assert all(torch.equal(a[k], b[k]) for k in a) and "vision.code_sum" in a
    out = tokenizer_run.parent / "eval"
    assert cli.main(["eval-encoder", str(tokenizer_run), "--out", str(out)]) == 0
    result = json.loads((out / "encoder_eval.json").read_text())
    rec = result["reconstruction"]
    assert rec["codebook_size"] == 16 and 1 <= rec["codes_used"] <= 16 and rec["psnr"] > 0
    assert "## Reconstruction (through the codes)" in (out / "encoder_eval.md").read_text()
    capsys.readouterr()
    assert cli.main(["export-encoder", str(tokenizer_run), str(tokenizer_run.parent / "x")]) != 0
    assert "is a VQ tokenizer run" in "".join(capsys.readouterr())


def test_a_chameleon_run_trains_the_codes_with_the_tokenizer_frozen_and_generates(
    tmp_path, world, tiny_config, tokenizer_run, monkeypatch
) -> None:
    from mm1 import cli
    from mm1.checkpoint import read_model_weights
    from mm1.eval.image_generation import unconditional_prompt
    from mm1.models.chameleon import Chameleon
    from mm1.pretrained import load_pretrained

    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=2)
    start = [f"train.init.vision={tokenizer_run}", "data.caption_first=0.5"]
    # train.train_vision stays at its default (true): the tokenizer is frozen all the same
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *VQ, *start]) == 0
    loss, aux = logged(run, "loss"), logged(run, "aux_loss_image_codes")
    total = logged(run, "loss_total")
    assert sorted(aux) == [1, 2] and all(v > 0 for v in aux.values())
    for step in (1, 2):  # weight 1 by default: the objective is their sum
        assert total[step] == pytest.approx(loss[step] + aux[step], rel=1e-6)
    tokenizer, trained = read_model_weights(tokenizer_run).state, read_model_weights(run).state
    vision = {k: v for k, v in tokenizer.items() if k.startswith("vision.")}
    assert vision and all(torch.equal(trained[k], v) for k, v in vision.items())

    p = load_pretrained(run)
    assert isinstance(p.model, Chameleon)
    assert p.model.decoder.embed_tokens.weight.shape[0] == p.tokenizer.vocab_size + 16
    out = tmp_path / "gen"
    args = ["eval-generation", str(run), "--max-images", "8", "--out", str(out)]
    assert cli.main(args) == 0
    result = json.loads((out / "image_generation.json").read_text())
    assert result["images"] == 8 and 0 <= result["code_match"] <= 1
    assert 1 <= result["distinct_generations"] <= result["captions"]
    assert "l1" not in result and "generated_pixels" not in result
    assert "of generated codes are the image's own" in (out / "image_generation.md").read_text()
    assert result["sampling"]["do_sample"] is False
    sampled = tmp_path / "sampled"
    args = ["eval-generation", str(run), "--max-images", "8", "--out", str(sampled)]
    assert cli.main([*args, "--temperature", "1", "--top-k", "8", "--seed", "3"]) == 0
    drawn = json.loads((sampled / "image_generation.json").read_text())
    assert drawn["sampling"] == {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 8,
        "top_p": 1.0,
        "seed": 3,
        "guidance_scale": 1.0,
    }
    assert (
        "sampled at temperature 1, top-k 8, seed 3" in (sampled / "image_generation.md").read_text()
    )
    assert (out / "image_generation.png").stat().st_size > 0
    # classifier-free guidance: away from what follows BOS alone (an image-first pair's start)
    assert unconditional_prompt(p) == [p.tokenizer.bos_id]
    with monkeypatch.context() as patched:  # a tokenizer without BOS, and no boundaries
        patched.setattr(type(p.tokenizer), "bos_id", property(lambda self: None))
        with pytest.raises(ConfigError, match="no unconditional prediction to guide against"):
            unconditional_prompt(p)
    guided = tmp_path / "guided"
    args = ["eval-generation", str(run), "--max-images", "8", "--out", str(guided)]
    assert cli.main([*args, "--guidance-scale", "3"]) == 0
    assert json.loads((guided / "image_generation.json").read_text())["sampling"] == {
        **result["sampling"],
        "guidance_scale": 3.0,
    }
    assert "greedy, classifier-free guidance 3." in (guided / "image_generation.md").read_text()
    assert cli.main([*args, "--guidance-scale", "nan"]) != 0

    # `mm1 generate-image`: sampled draws side by side, the same for the same seed
    draws = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in draws:
        args = ["generate-image", str(run), "--prompt", "a red circle", "--n", "3"]
        assert cli.main([*args, "--temperature", "1", "--top-k", "8", "--out", str(path)]) == 0
    from PIL import Image

    with Image.open(draws[0]) as a, Image.open(draws[1]) as b:
        assert a.size == (3 * 32, 32) and a.tobytes() == b.tobytes()
    # in bf16 (the tokenizer kept in fp32, `weight_dtype`): both commands run, and say so
    low = tmp_path / "bf16"
    args = ["eval-generation", str(run), "--max-images", "8", "--out", str(low), "--dtype", "bf16"]
    assert cli.main(args) == 0
    runtime = json.loads((low / "image_generation.json").read_text())["runtime"]
    assert runtime == {"device": "cpu", "dtype": "bfloat16"}
    args = ["generate-image", str(run), "--prompt", "a red circle", "--dtype", "bf16"]
    assert cli.main([*args, "--out", str(tmp_path / "c.png"), "--guidance-scale", "3"]) == 0

    from mm1.ablate.cell import SUITES

    metrics = SUITES["generation"](run, ["eval.max_examples=8"])
    assert metrics["generation/code_match"] == result["code_match"]
    assert "generation/l1" not in metrics

    # `benchmarks.guidance_sweep` over a study whose one cell is this run: at scale 1 it scores
    # what eval-generation did above
    from benchmarks import guidance_sweep

    study = tmp_path / "study"
    study.mkdir()
    (study / "grid.json").write_text(json.dumps({"cells": [{"id": "c", "label": "cham"}]}))
    (study / "c").symlink_to(run)
    (run / "cell.json").write_text(json.dumps({"status": "done"}))
    rows = guidance_sweep.collect(study, [1.0, 2.0], max_images=8)
    assert list(rows["cham"]) == ["greedy g1", "greedy g2", "sampled g1", "sampled g2"]
    plain = rows["cham"]["greedy g1"][0]
    assert plain["r1"] == result["text_to_image"]["text_to_image_r1"]
    assert plain["cosine_own"] == result["cosine_own"]
    assert "| cham | greedy | 2 | 1 |" in guidance_sweep.table(rows)


def test_starting_points_carry_the_decoder_over_and_refuse_the_wrong_encoder_run(
    tmp_path, world, tiny_config, tokenizer_run
) -> None:
    """An MM1 run's decoder starts a chameleon decoder (the code rows are new); a ViT run
    cannot start a chameleon model's tokenizer, nor a VQ run an MM1 model's encoder."""
    from mm1 import cli
    from mm1.checkpoint import read_model_weights
    from mm1.config import InitConfig, load_config
    from mm1.models.build import build_model
    from mm1.models.starting_point import expected_shapes, starting_state

    mm1_run = tmp_path / "mm1"
    cfg = tiny_config(tmp_path, world, steps=1, save_every=1, parallel="none", val_every=0)
    assert cli.main(["train", str(cfg), f"train.run_dir={mm1_run}"]) == 0
    out = str(tmp_path / "x.png")
    assert cli.main(["generate-image", str(mm1_run), "--prompt", "a", "--out", out]) != 0
    model_cfg = load_config(cfg, VQ).model
    saved = read_model_weights(mm1_run)
    vocab = saved.config.decoder.vocab_size
    model = build_model(model_cfg, vocab, saved.config.image_token_id, load_weights=False)
    init = InitConfig(vision=str(tokenizer_run), decoder=str(mm1_run))
    state = starting_state(init, model.cfg, expected_shapes(model))
    embed = state["decoder.embed_tokens.weight"]
    assert embed.shape[0] == vocab + 16
    assert torch.equal(embed[:vocab], saved.state["decoder.embed_tokens.weight"])
    layer = "decoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[layer], saved.state[layer])

    from tests.train.run_configs import encoder_config

    aim = tmp_path / "aim_run"
    from mm1.config.encoder import load_encoder_config
    from mm1.train.encoder_trainer import EncoderTrainer

    aim_cfg = encoder_config(tmp_path, world, "aim", steps=1, val_every=0, save_every=1)
    EncoderTrainer(load_encoder_config(aim_cfg, [f"train.run_dir={aim}"])).fit()
    with pytest.raises(ConfigError, match=r"encoder\.objective=aim, and model\.family=chameleon"):
        starting_state(InitConfig(vision=str(aim)), model.cfg, expected_shapes(model))
    # an HF vision tower is no tokenizer: refused before anything is built
    from mm1.models.build import resolve_config

    hf_vision = tmp_path / "hf_vision"
    hf_vision.mkdir()
    (hf_vision / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(ConfigError, match=r"is a transformers vision model; model\.family=chame"):
        resolve_config(model_cfg, vocab, init=InitConfig(vision=str(hf_vision)))
    with pytest.raises(ConfigError, match=r"encoder\.objective=vq, and model\.family=mm1"):
        plain = build_model(load_config(cfg).model, vocab, load_weights=False)
        starting_state(InitConfig(vision=str(tokenizer_run)), plain.cfg, expected_shapes(plain))


def test_two_process_fsdp_chameleon_run_resumes_bit_exactly(
    tmp_path: Path, world, tiny_config, tokenizer_run, two_process_run_and_resume
) -> None:
    """2 gloo processes, FSDP2 (the frozen tokenizer sharded with the root): a run resumed from
    its step-2 checkpoint logs the uninterrupted run's losses, the codes' included, and ends
    with its weights."""
    from mm1.checkpoint import read_model_weights

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="fsdp", val_every=0)
    args = [*VQ, f"train.init.vision={tokenizer_run}", "data.image_boundaries=true"]
    full, resumed = two_process_run_and_resume(tmp_path, cfg, args)
    for key in ("loss", "aux_loss_image_codes"):
        assert sorted(logged(full, key)) == [1, 2, 3, 4]
        assert logged(resumed, key) == logged(full, key)  # bit-exact on CPU
    a, b = read_model_weights(full).state, read_model_weights(resumed).state
    assert all(torch.equal(a[k], b[k]) for k in a)
