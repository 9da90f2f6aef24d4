"""SFT as a stage: a run started from a pre-trained run (`train.init.weights`) at a larger image
size, on conversations, gets a fresh optimizer and schedule and carries the source's tokenizer,
chat template and prompt format (image boundaries) along; it trains, and resumes as itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mm1.data.prompt_format import saved_image_boundaries
from mm1.data.tokenizer import Tokenizer
from mm1.train.optim import lr_factor

LR, WARMUP, SFT_STEPS = 1e-3, 2, 3


@pytest.fixture(scope="module")
def pretrained(make_trainer, tmp_path_factory, world, tiny_config) -> Path:
    """A 32 px run pre-trained for 4 steps with image boundaries and the vicuna template (its
    schedule is past warmup)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    cfg = tiny_config(tmp, world, steps=4, save_every=4, parallel="none", val_every=0)
    make_trainer(
        cfg, tmp / "run", "data.image_boundaries=true", "data.chat_template=vicuna_v1"
    ).fit()
    return tmp / "run"


def _sft_config(tmp: Path, world: Path, tiny_config) -> Path:
    """The SFT stage: 48 px, the world's conversations, nothing about the prompt format."""
    path = tiny_config(tmp, world, steps=SFT_STEPS, save_every=2, parallel="none", val_every=0)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["vision"]["image_size"] = 48
    cfg["data"]["seq_len"] = 128
    cfg["data"]["sources"] = [
        {"format": "llava", "path": str(world / "sft" / "llava.json"), "weight": 2.0},
        {"format": "llava_yaml", "path": str(world / "sft" / "datasets.yaml"), "weight": 1.0},
    ]
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_sft_stage_starts_fresh_from_a_pretrained_run(
    make_trainer, tmp_path, world, pretrained, tiny_config
) -> None:
    run = tmp_path / "sft"
    trainer = make_trainer(
        _sft_config(tmp_path, world, tiny_config), run, f"train.init.weights={pretrained}"
    )
    trainer.setup()
    # a fresh optimizer and schedule: step 0, no moments, warmup from its start
    assert trainer.step == 0 and not trainer.optimizer.state
    assert trainer.scheduler.last_epoch == 0
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(LR * lr_factor(0, WARMUP, 3, 0.1))
    # the source's tokenizer, chat template and prompt format, carried along and saved
    source_tok = Tokenizer.from_file(pretrained / "tokenizer")
    assert trainer.data.tokenizer.vocab_size == source_tok.vocab_size
    assert source_tok.chat_template is not None
    assert trainer.data.tokenizer.chat_template == source_tok.chat_template
    assert trainer.cfg.data.image_boundaries is True
    assert trainer.loader.dataset.s.prompt_format.image_boundaries is True
    assert saved_image_boundaries(run / "tokenizer") is True
    assert Tokenizer.from_file(run / "tokenizer").chat_template == source_tok.chat_template
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["image_boundaries"] is True
    # the sequences hold <img> ... </img> around every image's slots
    batch = next(iter(trainer.loader))
    tok = trainer.data.tokenizer
    n_images = int((batch.input_ids == tok.image_id).sum()) // trainer.raw_model.num_image_tokens
    assert n_images > 0
    assert int((batch.input_ids == tok.token_to_id("<img>")).sum()) == n_images
    # the position embeddings fitted 48 px (the fit check passed), and it trains
    assert trainer.raw_model.vision.pos_embed.shape[1] == 1 + (48 // 8) ** 2
    trainer.fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in steps)
    want = [LR * lr_factor(s, WARMUP, SFT_STEPS, 0.1) for s in range(1, SFT_STEPS + 1)]
    assert [r["lr"] for r in steps] == pytest.approx(want)
    assert json.loads((run / "init.json").read_text())["sources"][0]["step"] == 4


def test_a_resumed_sft_stage_keeps_its_own_prompt_format(
    make_trainer, tmp_path, world, pretrained, tiny_config
) -> None:
    """Resuming reads no starting point: the run's own prompt format, and the config (with the
    prompt format unset, as it was) is not a changed one."""
    import shutil

    run, start = tmp_path / "sft", shutil.copytree(pretrained, tmp_path / "pre")
    cfg = _sft_config(tmp_path, world, tiny_config)
    first = make_trainer(cfg, run, f"train.init.weights={start}", "train.steps=2")
    first.fit()
    saved = {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()}
    template = first.data.tokenizer.chat_template
    # The starting point's template changes (an updated snapshot): the run keeps its own; it
    # read and saved the new one, silently, and trained on with it.
    edited = Tokenizer.from_file(start / "tokenizer")
    edited.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    edited.save(start / "tokenizer")
    resumed = make_trainer(cfg, run, f"train.init.weights={start}", "train.steps=3")
    resumed.setup()
    assert resumed.step == 2 and resumed.cfg.data.image_boundaries is True
    assert resumed.data.tokenizer.chat_template == template
    assert {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()} == saved
    # ... or is deleted once the stage has begun: it resumes (it failed: no tokenizer.json)
    shutil.rmtree(start)
    gone = make_trainer(cfg, run, f"train.init.weights={start}", "train.steps=3")
    assert gone.fit()["step"] == 3


def test_a_set_prompt_format_wins_over_the_carried_one(
    make_trainer, tmp_path, world, pretrained, tiny_config
) -> None:
    trainer = make_trainer(
        _sft_config(tmp_path, world, tiny_config),
        tmp_path / "sft",
        f"train.init.weights={pretrained}",
        "data.image_boundaries=false",
    )
    trainer.setup()
    assert trainer.cfg.data.image_boundaries is False
    assert saved_image_boundaries(tmp_path / "sft" / "tokenizer") is False


def test_a_run_from_scratch_writes_no_image_boundaries(
    make_trainer, tmp_path, world, tiny_config
) -> None:
    cfg = tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0)
    trainer = make_trainer(cfg, tmp_path / "run")
    trainer.setup()
    assert trainer.cfg.data.image_boundaries is False
