"""`mm1 info`'s model-state memory (`training_state_bytes`, on a meta-built model) against what
a run holds after a step: its parameters and buffers, gradients and AdamW state, byte for
byte, with every part training, with LoRA and with QLoRA's NF4 weights; and per process of a
2-process run, FSDP2-sharded (a frozen image tokenizer left whole) and DDP."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from mm1.models.family import family_spec
from mm1.train.state_memory import training_state_bytes
from tests.gloo import WORLD, gloo_rank, spawn_ranks

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


PROCESS_ARMS = {
    "fsdp": ["train.parallel=fsdp"],
    "fsdp_frozen_vision_lora": [
        "train.parallel=fsdp",
        "train.train_vision=false",
        "train.lora.rank=4",
        "train.lora.alpha=8",
    ],
    "fsdp_chameleon": [  # its random tokenizer frozen, left whole on every process
        "train.parallel=fsdp",
        "model.family=chameleon",
        "model.vq.channels=[8,8,8,8]",
        "model.vq.codebook_size=16",
        "model.vq.code_dim=4",
    ],
    "ddp": ["train.parallel=ddp"],
}


def _storages(tensors) -> dict[int, int]:
    """Each distinct storage the tensors' local parts (a DTensor's shard) use, and its bytes."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}


def _held_worker(rank: int, root: str, cfg: str, overrides: list[str]) -> None:
    """One step of the run on this rank; what it holds, with its gradients as the step saw
    them (before they are cleared), saved for the test."""
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    with gloo_rank(rank, root):
        from mm1.config import load_config
        from mm1.train import trainer as trainer_module
        from mm1.train.trainer import Trainer

        os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
        grads: dict = {}
        clip = torch.nn.utils.clip_grad_norm_

        def clip_and_record(params, max_norm):
            grads.update(
                count=len(params), bytes=_storages([p.grad for p in params]), params=params
            )
            return clip(params, max_norm)

        trainer_module.torch.nn.utils.clip_grad_norm_ = clip_and_record
        trainer = Trainer(load_config(cfg, [f"train.run_dir={root}/run", *overrides]))
        trainer.fit()
        model = trainer.raw_model
        params = {id(p): p for p in model.parameters()}.values()
        states = [t for s in trainer.optimizer.state.values() for t in s.values()]
        family = family_spec(trainer.model_cfg.family)
        with torch.device("meta"):
            shells = [family.model(trainer.model_cfg) for _ in range(2)]
        estimate = training_state_bytes(shells[0], trainer.cfg.train, WORLD)
        whole = training_state_bytes(shells[1], trainer.cfg.train)  # one process's figure
        held = {
            "weights": sum(_storages(params).values()) + sum(b.nbytes for b in model.buffers()),
            "gradients": sum(grads["bytes"].values()),
            "gradient_storages": len(grads["bytes"]),
            "gradient_count": grads["count"],
            "trained": sum(p.requires_grad for p in params),
            "optimizer": sum(
                (t.to_local() if hasattr(t, "to_local") else t).nbytes for t in states
            ),
            "estimate": estimate.__dict__,
            "whole": whole.__dict__,
        }
        torch.save(held, Path(root) / f"held{rank}.pt")


@pytest.mark.parametrize("arm", PROCESS_ARMS)
def test_model_states_per_process_are_what_each_of_two_processes_holds(
    tmp_path: Path, world, tiny_config, arm: str
) -> None:
    """`--processes 2`: the figure is what the first process holds after a step, byte for byte
    (FSDP2 pads each shard to ceil(rows / 2) rows; the second holds the same or less). Under
    DDP the gradients are views of the all-reduce buckets: no second copy."""
    cfg = tiny_config(tmp_path, world, steps=1, val_every=0)
    spawn_ranks(_held_worker, tmp_path, str(cfg), PROCESS_ARMS[arm], what=f"{arm} step")
    held = [torch.load(tmp_path / f"held{r}.pt") for r in range(WORLD)]
    estimate = held[0]["estimate"]
    assert held[0]["gradient_count"] == held[0]["trained"]  # every trained weight got one
    for part in ("weights", "gradients", "optimizer"):
        assert held[0][part] == estimate[part], part
        assert held[1][part] <= estimate[part], part
    if arm == "ddp":
        assert held[0]["gradient_storages"] < held[0]["gradient_count"]  # bucket views
    else:  # sharded: about half of one process's figure
        assert estimate["optimizer"] < 0.75 * held[0]["whole"]["optimizer"]
