"""`model.family: seed` end to end from the CLI: a SEED tokenizer trained by `mm1 train-encoder`
over a CLIP run's frozen towers (resuming exactly, scored by `mm1 eval-encoder`, refused where
its CLIP run does not fit), read by a seed run that trains the image codes' cross-entropy beside
the text's with the tokenizer frozen and scores its generated images; starting points of the
wrong kind refused, and a 2-process FSDP2 run resuming bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError
from tests.train.run_configs import logged

# 3 codes per image of a 16-code book, in the CLIP run's 16-wide space.
SEED = [
    "model.seed.num_queries=3",
    "model.seed.layers=1",
    "model.seed.decoder_layers=1",
    "model.seed.codebook_size=16",
    "model.seed.code_dim=4",
    "model.seed.embed_dim=16",
]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, world) -> Path:
    from mm1.config.encoder import load_encoder_config
    from mm1.train.encoder_trainer import EncoderTrainer
    from tests.train.run_configs import encoder_config

    tmp = tmp_path_factory.mktemp("clip")
    cfg = encoder_config(tmp, world, "clip", steps=2, val_every=0, save_every=2)
    run = tmp / "clip"
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={run}"])).fit()
    return run


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, world, clip_run) -> Path:
    """A SEED tokenizer run of 4 steps over `clip_run`, and the same run resumed from step 2
    beside it."""
    from mm1.config.encoder import load_encoder_config
    from mm1.train.encoder_trainer import EncoderTrainer
    from tests.train.run_configs import encoder_config

    tmp = tmp_path_factory.mktemp("seed")
    cfg = encoder_config(tmp, world, "seed")
    start = [f"train.init.vision={clip_run}", *SEED]
    straight, split = tmp / "straight", tmp / "split"
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={straight}", *start])).fit()
    first = load_encoder_config(cfg, [f"train.run_dir={split}", "train.steps=2", *start])
    assert EncoderTrainer(first).fit()["step"] == 2
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={split}", *start])).fit()
    return straight


def test_a_seed_tokenizer_run_keeps_its_clip_towers_resumes_exactly_and_is_scored(
    tokenizer_run: Path, clip_run: Path, capsys
) -> None:
    """The CLIP run's ViT, image projection and text tower come over and stay as they were; the
    codebook's EMA state resumes with the weights (the resumed run logs the uninterrupted one's
    losses); `mm1 eval-encoder` scores it, its untrained baseline keeps the CLIP towers, and
    `export-encoder` refuses it."""
    from mm1 import cli
    from mm1.checkpoint import read_model_weights

    split = tokenizer_run.parent / "split"
    for key in ("loss", "contrastive", "generation", "codes_restarted"):
        assert sorted(logged(tokenizer_run, key)) == [1, 2, 3, 4]
        assert logged(split, key) == logged(tokenizer_run, key)
    a, b = read_model_weights(tokenizer_run).state, read_model_weights(split).state
    assert all(torch.equal(a[k], b[k]) for k in a) and "vision.code_sum" in a
    clip = read_model_weights(clip_run).state
    carried = {"vision.": "vision.vit.", "image_proj.": "vision.image_proj.", "text": "text"}
    for k, v in clip.items():
        if k != "logit_scale":
            prefix = next(p for p in carried if k.startswith(p))
            assert torch.equal(a[carried[prefix] + k.removeprefix(prefix)], v), k

    out = tokenizer_run.parent / "eval"
    assert cli.main(["eval-encoder", str(tokenizer_run), "--out", str(out)]) == 0
    result = json.loads((out / "encoder_eval.json").read_text())
    seed = result["seed"]
    assert seed["codebook_size"] == 16 and 0 < seed["codes_used"] <= 1
    assert -1 <= seed["generation_cosine"] <= 1 and seed["generation_r1_chance"] > 0
    assert {"zero_shot", "retrieval", "linear_probe"} <= set(result)
    assert "## Through the codes (de-tokenized)" in (out / "encoder_eval.md").read_text()
    assert result["runtime"] == {"device": "cpu", "dtype": "float32"}
    # in bf16 (`--dtype`): the codes come back exact, the scores near fp32's
    low = tokenizer_run.parent / "eval-bf16"
    assert cli.main(["eval-encoder", str(tokenizer_run), "--out", str(low), "--dtype", "bf16"]) == 0
    in_bf16 = json.loads((low / "encoder_eval.json").read_text())
    assert in_bf16["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    assert in_bf16["seed"]["causal_cosine"] == pytest.approx(seed["causal_cosine"], abs=0.05)
    assert 0 < in_bf16["seed"]["codes_used"] <= 1
    from mm1.eval.encoders import untrained_like
    from mm1.models.encoders import load_encoder_run

    run_cfg, trained = load_encoder_run(tokenizer_run)
    fresh = untrained_like(trained, run_cfg, trained.text.embed_tokens.num_embeddings, 0)
    before, after = trained.state_dict(), fresh.state_dict()
    for k, v in before.items():  # the CLIP towers kept, the rest drawn afresh
        kept = k.startswith(("vision.vit.", "vision.image_proj.", "text.", "text_proj."))
        assert torch.equal(after[k], v) == kept or k == "vision.code_count", k
    capsys.readouterr()
    assert cli.main(["export-encoder", str(tokenizer_run), str(tokenizer_run.parent / "x")]) != 0
    assert "is a SEED tokenizer run" in "".join(capsys.readouterr())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["model.vision.mlp_dim=48"], r"model\.vision\.mlp_dim=48, and the CLIP run"),
        (["encoder.text.width=16"], r"encoder\.text\.width=16, and the CLIP run"),
        (["model.seed.embed_dim=8"], r"model\.seed\.embed_dim=8, and the CLIP run .* embeds"),
    ],
)
def test_a_seed_tokenizer_run_refuses_a_clip_run_that_does_not_fit(
    tmp_path, world, clip_run, change: list[str], message: str
) -> None:
    from mm1.config.encoder import load_encoder_config
    from mm1.train.encoder_trainer import EncoderTrainer
    from tests.train.run_configs import encoder_config

    cfg = encoder_config(tmp_path, world, "seed")
    args = [f"train.run_dir={tmp_path / 'run'}", f"train.init.vision={clip_run}", *SEED, *change]
    with pytest.raises(ConfigError, match=message):
        EncoderTrainer(load_encoder_config(cfg, args)).fit()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_seed_run_trains_the_codes_with_the_tokenizer_frozen_and_scores_generation(
    tmp_path, world, tiny_config, tokenizer_run, clip_run
) -> None:
    from mm1 import cli
    from mm1.checkpoint import read_model_weights
    from mm1.config import InitConfig, load_config
    from mm1.models.build import build_model
    from mm1.models.seed import SEED as SEEDModelClass
    from mm1.models.starting_point import expected_shapes, starting_state
    from mm1.pretrained import load_pretrained

    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=2)
    family = ["model.family=seed", *SEED]
    start = [f"train.init.vision={tokenizer_run}", "data.caption_first=0.5"]
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *family, *start]) == 0
    loss, aux = logged(run, "loss"), logged(run, "aux_loss_image_codes")
    total = logged(run, "loss_total")
    assert sorted(aux) == [1, 2] and all(v > 0 for v in aux.values())
    for step in (1, 2):
        assert total[step] == pytest.approx(loss[step] + aux[step], rel=1e-6)
    tokenizer, trained = read_model_weights(tokenizer_run).state, read_model_weights(run).state
    vision = {k: v for k, v in tokenizer.items() if k.startswith("vision.")}
    assert vision and all(torch.equal(trained[k], v) for k, v in vision.items())

    p = load_pretrained(run)
    assert isinstance(p.model, SEEDModelClass) and p.model.num_image_tokens == 3
    out = tmp_path / "gen"
    args = ["eval-generation", str(run), "--max-images", "8", "--out", str(out)]
    assert cli.main([*args, "--temperature", "1", "--seed", "2"]) == 0
    result = json.loads((out / "image_generation.json").read_text())
    assert result["images"] == 8 and 0 <= result["code_match"] <= 1
    assert "l1" not in result and "generated_pixels" not in result
    report = (out / "image_generation.md").read_text()
    assert "seed's generation embeddings against the images' CLIP embeddings" in report
    assert (out / "image_generation.png").stat().st_size > 0
    png = str(tmp_path / "x.png")
    assert cli.main(["generate-image", str(run), "--prompt", "a red circle", "--out", png]) != 0

    # starting points: a SEED run starts only a seed model's tokenizer, and a seed model's
    # tokenizer comes from nothing else (a CLIP run, an HF vision tower)
    model_cfg = load_config(cfg, family).model
    vocab = p.tokenizer.vocab_size
    model = build_model(model_cfg, vocab, p.cfg.image_token_id, load_weights=False)
    with pytest.raises(ConfigError, match=r"encoder\.objective=clip, and model\.family=seed"):
        starting_state(InitConfig(vision=str(clip_run)), model.cfg, expected_shapes(model))
    # a tokenizer is read as it was trained: another Q-Former depth or activation is refused
    for change, key in (
        ("model.seed.layers=2", "seed.layers=2"),
        ("model.vision.act=gelu", "vision.act"),
    ):
        other = build_model(load_config(cfg, [*family, change]).model, vocab, load_weights=False)
        with pytest.raises(ConfigError, match=rf"model\.{key}.*, and the tokenizer run"):
            starting_state(InitConfig(vision=str(tokenizer_run)), other.cfg, expected_shapes(other))
    plain = build_model(load_config(cfg).model, vocab, load_weights=False)
    with pytest.raises(ConfigError, match=r"encoder\.objective=seed, and model\.family=mm1"):
        starting_state(InitConfig(vision=str(tokenizer_run)), plain.cfg, expected_shapes(plain))
    from mm1.models.build import resolve_config

    hf_vision = tmp_path / "hf_vision"
    hf_vision.mkdir()
    (hf_vision / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(ConfigError, match=r"transformers vision model; model\.family=seed"):
        resolve_config(model_cfg, vocab, init=InitConfig(vision=str(hf_vision)))


def test_two_process_fsdp_seed_tokenizer_run_resumes_bit_exactly(
    tmp_path: Path, world, clip_run, two_process_run_and_resume
) -> None:
    """2 gloo processes, FSDP2: the gathered contrastive term, the per-rank means beside it and
    the codebook's all-reduced EMA step; a run resumed from its step-2 checkpoint logs the
    uninterrupted run's losses and ends with its weights."""
    from mm1.checkpoint import read_model_weights
    from tests.train.run_configs import encoder_config

    cfg = encoder_config(tmp_path, world, "seed", parallel="fsdp", val_every=0)
    args = [f"train.init.vision={clip_run}", *SEED]
    full, resumed = two_process_run_and_resume(tmp_path, cfg, args, command="train-encoder")
    for key in ("loss", "generation"):
        assert sorted(logged(full, key)) == [1, 2, 3, 4]
        assert logged(resumed, key) == logged(full, key)
    a, b = read_model_weights(full).state, read_model_weights(resumed).state
    assert all(torch.equal(a[k], b[k]) for k in a)
