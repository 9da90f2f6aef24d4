"""Encoder pre-training: AIM's targets and masks on known inputs, the encoder config's one-line
errors, and exact resume of an encoder run (CLIP and AIM) through the trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError, ModelConfig, VisionConfig
from mm1.config.encoder import AIMObjectiveConfig, load_encoder_config
from mm1.models.aim import (
    AIMModel,
    normalised_patches,
    patchify,
    prefix_causal_mask,
    sample_prefix,
    target_mask,
)
from mm1.train.encoder_trainer import EncoderTrainer
from tests.train.run_configs import encoder_config


def test_patchify_orders_patches_as_the_vit_and_pixels_row_column_channel() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 is the top-right one: rows 0-1, columns 2-3; its pixels row by row, RGB each
    want = [x[1, c, r, col] for r in (0, 1) for col in (2, 3) for c in range(3)]
    assert p[1, 1].tolist() == torch.stack(want).tolist()
    # the ViT's patch order is its conv output flattened row-major
    conv = torch.nn.Conv2d(3, 1, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 0] = 1.0  # picks channel 0, row 1, column 0 of each patch
    assert conv(x).flatten(2)[:, 0].tolist() == p[:, :, 6].tolist()


def test_targets_are_normalised_per_patch() -> None:
    patches = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])
    t = normalised_patches(patches, eps=1e-6)
    expect = [(v - 2.5) / math.sqrt(1.25 + 1e-6) for v in (1, 2, 3, 4)]
    assert t[0, 0].tolist() == pytest.approx(expect)
    assert t[0, 1].tolist() == [0.0] * 4  # a flat patch: zeros, not a division by zero


def test_prefix_causal_mask_and_the_counted_targets() -> None:
    prefix = torch.tensor([2])
    got = prefix_causal_mask(prefix, num_patches=4, cls=True)[0, 0].int().tolist()
    # tokens: CLS, p0..p3; CLS, p0, p1 are the prefix (bidirectional); p2, p3 causal
    assert got == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert prefix_causal_mask(prefix, 4, cls=False)[0, 0, 0].int().tolist() == [1, 1, 0, 0]
    # predictions of patches 1, 2, 3 (made at 0, 1, 2): only patches 2, 3 are after the prefix
    assert target_mask(prefix, 4).tolist() == [[False, True, True]]


def _tiny_aim() -> AIMModel:
    vision = VisionConfig(image_size=16, patch_size=4, width=16, layers=2, heads=2, mlp_dim=32)
    torch.manual_seed(0)
    return AIMModel(ModelConfig(vision=vision), AIMObjectiveConfig(head_dim=16))


def test_aim_loss_predicts_the_next_patch_after_the_prefix_only() -> None:
    model = _tiny_aim()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = model(x, generator=torch.Generator().manual_seed(5)).loss
    prefix = sample_prefix(3, 16, 1, torch.Generator().manual_seed(5))
    feats = model.vision(x, prefix_causal_mask(prefix, 16, cls=True))
    target = normalised_patches(patchify(x, 4))
    per_image = []
    for b in range(3):
        errs = [
            (model.pixel_head(feats[b, t - 1]) - target[b, t]).pow(2).mean()
            for t in range(int(prefix[b]), 16)
        ]
        per_image.append(torch.stack(errs).mean())
    assert loss.item() == pytest.approx(torch.stack(per_image).mean().item(), rel=1e-5)


def test_aim_features_before_a_patch_do_not_see_it() -> None:
    model = _tiny_aim()
    x = torch.randn(1, 3, 16, 16)
    prefix = torch.tensor([5])
    mask = prefix_causal_mask(prefix, 16, cls=True)
    y = x.clone()
    y[..., 12:, 12:] += 1.0  # the last patch
    a, b = model.vision(x, mask), model.vision(y, mask)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15], b[:, 15])
    # MM1 runs it bidirectionally: without the mask every patch sees the last one
    assert not torch.allclose(model.vision(x)[:, 0], model.vision(y)[:, 0])


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("objective", ["clip", "aim"])
def test_encoder_run_resumes_exactly(tmp_path: Path, world: Path, objective: str) -> None:
    cfg = encoder_config(tmp_path, world, objective)
    straight, split = tmp_path / "straight", tmp_path / "split"
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={straight}"])).fit()
    first = EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={split}", "train.steps=2"]))
    assert first.fit()["step"] == 2
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={split}"])).fit()
    assert _losses(split) == _losses(straight)
    assert len(_losses(straight)) == 4
    # a changed objective option is refused on resume
    with pytest.raises(ConfigError, match="encoder.aim.head_dim"):
        EncoderTrainer(
            load_encoder_config(cfg, [f"train.run_dir={split}", "encoder.aim.head_dim=8"])
        ).setup()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.micro_batch_size=1", "train.batch_size=2"], "train.micro_batch_size=1"),
        (["model.vision.image_size=30"], "model.vision.image_size=30"),
        (["encoder.text.proj_in=48"], "encoder.text.proj_in=48"),
        (["encoder.objective=mae"], "encoder.objective='mae'"),
        (["encoder.aim.min_prefix=16"], "encoder.aim.min_prefix=16"),
    ],
)
def test_bad_encoder_configs_name_the_key(tmp_path: Path, overrides, key) -> None:
    cfg = encoder_config(tmp_path, tmp_path / "world", "clip")
    with pytest.raises(ConfigError) as err:
        load_encoder_config(cfg, overrides)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_clip_refuses_sources_without_caption_pairs(tmp_path: Path, world: Path) -> None:
    cfg = encoder_config(tmp_path, world, "clip")
    text = world / "text"
    with pytest.raises(ConfigError, match=r"^data.sources\[0\].kind='text'"):
        load_encoder_config(cfg, [f"data.sources=[{{format: text, path: {text}}}]"])
    # AIM reads images: a text-only source is refused too, interleaved documents are not
    with pytest.raises(ConfigError, match=r"^data.sources\[0\].kind='text'"):
        load_encoder_config(
            cfg, ["encoder.objective=aim", f"data.sources=[{{format: text, path: {text}}}]"]
        )


@pytest.mark.parametrize("objective", ["clip", "aim"])
def test_a_trained_encoder_starts_mm1_at_another_resolution(
    tmp_path: Path, world: Path, objective: str, tiny_config, make_trainer
) -> None:
    from mm1.checkpoint import read_model_weights
    from mm1.models.vision import interpolate_pos_embed

    enc = tmp_path / "encoder"
    cfg = encoder_config(tmp_path, world, objective, steps=2, val_every=0)
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={enc}"])).fit()
    saved = read_model_weights(enc).state
    # MM1 at 48 px: a 6 x 6 patch grid where the encoder was trained on 4 x 4
    mm1_cfg = tiny_config(tmp_path, world, parallel="none", steps=1, val_every=0)
    trainer = make_trainer(
        mm1_cfg, tmp_path / "mm1", f"train.init.vision={enc}", "model.vision.image_size=48"
    )
    trainer.setup()
    vision = trainer.raw_model.vision.state_dict()
    for key, value in saved.items():
        if key.startswith("vision.") and key != "vision.pos_embed":
            torch.testing.assert_close(vision[key.removeprefix("vision.")], value)
    want = interpolate_pos_embed(saved["vision.pos_embed"], 6, has_cls=True)
    assert vision["pos_embed"].shape == (1, 37, 32)
    torch.testing.assert_close(vision["pos_embed"], want)
    assert trainer.data.processor.output_size == (48, 48)
    micro = [next(iter(trainer.loader)) for _ in range(trainer.accum)]
    assert math.isfinite(trainer.train_step(micro).loss)


def test_a_clip_encoder_exports_to_transformers_clip_vision_model(
    tmp_path: Path, world: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    from mm1 import cli
    from mm1.models.encoders import load_encoder_run

    enc = tmp_path / "encoder"
    cfg = encoder_config(tmp_path, world, "clip", steps=1, val_every=0, save_every=1)
    EncoderTrainer(load_encoder_config(cfg, [f"train.run_dir={enc}"])).fit()
    assert cli.main(["export-encoder", str(enc), str(tmp_path / "hf")]) == 0
    _, ours = load_encoder_run(enc)
    theirs = transformers.CLIPVisionModel.from_pretrained(tmp_path / "hf").eval()
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ours.vision(x)
        got = theirs(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_encoder_blocks_past_the_feature_layer_are_dropped_on_loading() -> None:
    from mm1.models.state_transforms import LoadContext, apply_chain

    t = torch.ones(2)
    state = {"vision.blocks.0.b": t, "vision.blocks.1.b": t, "vision.blocks.10.b": t}
    ctx = LoadContext("enc", ("vision",), {"vision.blocks.0.b": torch.Size([2])})
    assert list(apply_chain(dict(state), ctx)) == ["vision.blocks.0.b"]
    assert ctx.notes == ["vision blocks from 1 on dropped (past the feature layer)"]
    # a block the model has but the source lacks is still an error
    ctx = LoadContext("enc", ("vision",), {f"vision.blocks.{i}.b": torch.Size([2]) for i in (0, 2)})
    with pytest.raises(ValueError, match="has no vision.blocks.2.b"):
        apply_chain({"vision.blocks.0.b": t, "vision.blocks.1.b": t}, ctx)


def _hf_text_model(tmp: Path, world: Path, width: int = 32) -> Path:
    transformers = pytest.importorskip("transformers")
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(world / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab + 8,  # room for the tokens mm1's tokenizer adds
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
    )
    out = tmp / "hf_text"
    transformers.CLIPTextModel(cfg).save_pretrained(out)
    (out / "tokenizer.json").write_text((world / "tokenizer.json").read_text())
    return out


def test_an_hf_text_tower_trains_and_reads_each_caption_at_its_eos(
    tmp_path: Path, world: Path
) -> None:
    from mm1.config.encoder import TextTowerConfig
    from mm1.models.encoders import load_encoder_run
    from mm1.models.hf_text import HFTextTower

    hf = _hf_text_model(tmp_path, world)
    tower = HFTextTower(TextTowerConfig(width=32, max_len=8, hf=str(hf))).eval()
    ids = torch.tensor([[5, 6, 7, 9, 0, 0, 0, 0], [5, 8, 9, 10, 11, 12, 13, 9]])
    lengths = torch.tensor([4, 8])
    with torch.no_grad():
        got = tower(ids, lengths)
        for row in range(2):
            alone = tower.model(input_ids=ids[row : row + 1, : lengths[row]]).last_hidden_state
            torch.testing.assert_close(got[row], alone[0, -1])
    cfg = encoder_config(tmp_path, world, "clip", steps=2, val_every=0)
    over = [f"encoder.text.hf={hf}", "encoder.text.max_len=24", f"train.run_dir={tmp_path / 'r'}"]
    EncoderTrainer(load_encoder_config(cfg, over)).fit()
    _, model = load_encoder_run(tmp_path / "r")
    assert isinstance(model.text, HFTextTower)
    with pytest.raises(ConfigError, match=r"^encoder.text.width=48 does not match the hidden size"):
        load_encoder_config(cfg, [*over, "encoder.text.width=48"])


def test_two_process_clip_run_gathers_both_ranks_and_resumes_exactly(
    tmp_path: Path, world: Path, torchrun_cli
) -> None:
    """`mm1 train-encoder` under torchrun, 2 gloo processes, FSDP2: step 1's loss is the
    contrastive loss of one model on both ranks' batches joined, and a run resumed from its
    step-2 checkpoint logs the uninterrupted run's losses."""
    import shutil

    from mm1.data.caption_pairs import CaptionPairDataset

    cfg = encoder_config(tmp_path, world, "clip", parallel="fsdp", val_every=0, batch_size=8)
    full = tmp_path / "full"
    torchrun_cli(["train-encoder", str(cfg), f"train.run_dir={full}"], nproc=2)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    # only what the checkpoint had seen: steps 3 and 4 must be trained again to be logged
    metrics = resumed / "metrics.jsonl"
    kept = [r for r in metrics.read_text().splitlines() if json.loads(r).get("step", 0) <= 2]
    metrics.write_text("".join(f"{r}\n" for r in kept))
    out = torchrun_cli(["train-encoder", str(cfg), f"train.run_dir={resumed}"], nproc=2)
    assert "resumed from" in out
    want = _losses(full)
    assert [s for s, _ in want] == [1, 2, 3, 4]
    assert _losses(resumed) == want
    # The same initial model in this process, on rank 0's and rank 1's first batches joined.
    one = EncoderTrainer(
        load_encoder_config(cfg, [f"train.run_dir={tmp_path / 'one'}", "train.parallel=none"])
    )
    one.setup()
    settings = one._pair_settings(one.data.sources, one.cfg.data.seed)
    tok, proc = one.data.tokenizer, one.data.processor
    firsts = [next(iter(CaptionPairDataset(settings, tok, proc, r, 2))) for r in range(2)]
    assert not torch.equal(firsts[0].input_ids, firsts[1].input_ids)  # the ranks read apart
    with torch.no_grad():
        joined = one.raw_model(
            *(torch.cat([getattr(b, k) for b in firsts]) for k in ("pixel_values", "input_ids")),
            torch.cat([b.lengths for b in firsts]),
            torch.Generator(),
        )
        rank0_alone = one.raw_model(firsts[0].pixel_values, firsts[0].input_ids, firsts[0].lengths)
    assert want[0][1] == pytest.approx(joined.loss.item(), rel=1e-5)
    assert want[0][1] != pytest.approx(rank0_alone.loss.item(), rel=1e-3)
