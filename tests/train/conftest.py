"""Builders the training tests share, as fixtures: a tiny run config over a synthetic world,
tiny HF checkpoints to start from, and `mm1` run under torchrun."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import torchrun
from tests.train.run_configs import TINY_VISION


def _tiny_config(tmp: Path, world: Path, **train) -> Path:
    cfg = {
        "model": {
            "vision": dict(TINY_VISION),
            "connector": {"type": "avgpool", "num_tokens": 4},
            "decoder": {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_dim": 64},
        },
        "data": {"world": str(world), "seq_len": 64, "num_workers": 0},
        "train": {
            "steps": 6,
            "batch_size": 4,
            "micro_batch_size": 2,
            "log_every": 1,
            "val_every": 3,
            "val_batches": 1,
            "save_every": 2,
            "parallel": "fsdp",
            "tensorboard": False,
            "progress": False,
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            **train,
        },
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _make_hf_decoder(out: Path, world: Path, family: str = "Llama", **config):
    """A tiny transformers `{family}ForCausalLM` over the world's vocabulary, written by
    save_pretrained with the world's tokenizer.json beside it; the model."""
    transformers = pytest.importorskip("transformers")
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(str(world / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    hf_config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab, num_key_value_heads=2, **shape, **config
    )
    model = getattr(transformers, f"{family}ForCausalLM")(hf_config)
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text((world / "tokenizer.json").read_text())
    return model


@pytest.fixture(scope="session")
def make_hf_decoder() -> Callable[..., torch.nn.Module]:
    """`make_hf_decoder(out, world, family="Llama", **config)`: a tiny HF causal LM on disk."""
    return _make_hf_decoder


def _make_hf_checkpoints(tmp_path: Path, world: Path):
    """A tiny Llama (with the world's tokenizer.json beside it) and a tiny CLIP vision tower,
    written by transformers' save_pretrained."""
    transformers = pytest.importorskip("transformers")

    dec_dir, vis_dir = tmp_path / "llama", tmp_path / "clip"
    llama = _make_hf_decoder(dec_dir, world, tie_word_embeddings=False)
    clip = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    clip.save_pretrained(vis_dir)
    return dec_dir, vis_dir, llama, clip


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Path]:
    """`tiny_config(tmp, world, **train_options)`: writes a tiny run config, returns its path."""
    return _tiny_config


@pytest.fixture(scope="session")
def make_hf_checkpoints() -> Callable[[Path, Path], tuple]:
    """`make_hf_checkpoints(tmp, world)`: tiny Llama and CLIP directories (and the models)."""
    return _make_hf_checkpoints


@pytest.fixture(scope="module")
def world(tmp_path_factory, world_copy) -> Path:
    """The tiny synthetic world (seed 0), a copy for each test module."""
    return world_copy(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def torchrun_cli() -> Callable[[list[str], int], str]:
    """`torchrun_cli(args, nproc)`: runs `mm1 <args>` under torchrun, returns its output."""
    return torchrun


def _two_process_run_and_resume(
    tmp: Path, cfg: Path, args: list[str], command: str = "train"
) -> tuple[Path, Path]:
    """`mm1 COMMAND` (train, train-encoder) on 2 processes to its end (`tmp/full`, saving at
    step 2 and 4), and a copy of it without its step-4 checkpoint resumed to the end
    (`tmp/resumed`)."""
    import shutil

    full, resumed = tmp / "full", tmp / "resumed"
    torchrun([command, str(cfg), f"train.run_dir={full}", *args], nproc=2)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    out = torchrun([command, str(cfg), f"train.run_dir={resumed}", *args], nproc=2)
    assert "resumed from" in out
    return full, resumed


@pytest.fixture(scope="session")
def two_process_run_and_resume() -> Callable[..., tuple[Path, Path]]:
    """`two_process_run_and_resume(tmp, config, args, command="train")`: (the uninterrupted
    2-process run, the one resumed from its step-2 checkpoint)."""
    return _two_process_run_and_resume


def _make_trainer(cfg_path: Path, run: Path, *overrides: str):
    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    return Trainer(load_config(cfg_path, [f"train.run_dir={run}", *overrides]))


@pytest.fixture(scope="session")
def make_trainer() -> Callable[..., object]:
    """`make_trainer(config_path, run_dir, *overrides)`: a Trainer for that run."""
    return _make_trainer
