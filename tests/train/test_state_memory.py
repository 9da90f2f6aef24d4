"""`mm1 info`'s model-state memory (`training_state_bytes`, on a meta-built model) against what
a run holds after a step: its parameters and buffers, gradients and AdamW state, byte for
byte, with every part training, with LoRA and with QLoRA's NF4 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm1.models.family import family_spec
from mm1.train.state_memory import training_state_bytes

ARMS = {
    "full": [],
    "frozen_vision": ["train.train_vision=false"],
    "lora": ["train.lora.rank=4", "train.lora.alpha=8"],
    "qlora": ["train.lora.rank=4", "train.lora.alpha=8", "train.lora.quantize=nf4"],
}


@pytest.mark.parametrize("arm", ARMS)
def test_model_states_are_what_a_run_holds_after_a_step(
    make_trainer, tmp_path: Path, world, tiny_config, arm: str
) -> None:
    cfg = tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0)
    trainer = make_trainer(cfg, tmp_path / "run", *ARMS[arm])
    trainer.fit()
    model = trainer.raw_model
    params = {id(p): p for p in model.parameters()}.values()
    held = sum(t.nbytes for t in params) + sum(b.nbytes for b in model.buffers())
    trained = [p for p in params if p.requires_grad]
    states = [t for s in trainer.optimizer.state.values() for t in s.values()]
    assert len(states) == 3 * len(trained)  # exp_avg, exp_avg_sq, step

    with torch.device("meta"):
        shell = family_spec(trainer.model_cfg.family).model(trainer.model_cfg)
    estimate = training_state_bytes(shell, trainer.cfg.train)
    assert estimate.weights == held
    assert estimate.gradients == sum(p.nbytes for p in trained)
    assert estimate.optimizer == sum(t.nbytes for t in states)
