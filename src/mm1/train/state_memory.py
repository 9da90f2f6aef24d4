"""The memory a run's model states take on one process: its weights (NF4 codes for QLoRA's
frozen weights), a gradient per trained parameter and AdamW's two moments and step count for
each, computed on a model built on the meta device (`mm1 info --processes N`). Under FSDP2 a
process holds its shard of each parameter, its gradient and moments: a ceiling share of the
first dimension's rows (the shards are padded to equal size), the first process the most.
Activations are not counted: they depend on the batch, the sequence length and activation
checkpointing; nor are FSDP2's all-gathered weights of the block at work."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from mm1.config import TrainConfig
from mm1.models.nf4 import BLOCK, scaler_block_size

STEP_BYTES = 4  # AdamW's `step`: one fp32 scalar tensor per parameter


@dataclass(frozen=True)
class StateBytes:
    weights: int  # parameters and buffers, NF4 buffers in place of the weights they hold
    gradients: int  # one per trained parameter, in its dtype
    optimizer: int  # AdamW: exp_avg and exp_avg_sq per trained parameter, and its step

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def nf4_bytes(shape: tuple[int, ...], element_size: int) -> int:
    """The bytes of an `NF4Weight`'s buffers for a weight of `shape` in a dtype of
    `element_size`: two codes per byte, an int8 scaler per block of 64, an fp32 factor per
    block of scalers, their fp32 mean, the 16 levels in the weight's dtype, the int64 shape."""
    numel = math.prod(shape)
    scalers = numel // BLOCK
    factors = scalers // scaler_block_size(numel)
    return numel // 2 + scalers + 4 * factors + 4 + 16 * element_size + 8 * len(shape)


def training_state_bytes(model: nn.Module, t: TrainConfig, processes: int = 1) -> StateBytes:
    """The model states that the first of `processes` processes holds training `model` (built
    on the meta device; adapters are added to it in place) as `t` configures: which parts
    train, LoRA and its NF4 weights, and `t.parallel` (FSDP2 shards, DDP replicates)."""
    from mm1.models.family import family_of
    from mm1.models.lora import LoRALinear, add_decoder_lora
    from mm1.train.optim import set_trainable
    from mm1.train.parallel import (
        fsdp_ignored_params,
        fsdp_shards,
        refuse_unsupported_processes,
    )

    refuse_unsupported_processes(t, processes)

    quantized = 0  # bytes of the frozen weights NF4 holds, less their codes'
    if t.lora.rank:
        add_decoder_lora(model, replace(t.lora, quantize="none"))
        if t.lora.quantize == "nf4":
            for m in model.decoder.modules():
                if isinstance(m, LoRALinear):
                    w = m.weight
                    quantized += w.numel() * w.element_size()
                    quantized -= nf4_bytes(tuple(w.shape), w.element_size())
    set_trainable(model, t)
    shards = fsdp_shards(t, processes)
    whole = {id(p) for p in fsdp_ignored_params(model, family_of(model))} if shards > 1 else set()
    params = {id(p): p for p in model.parameters()}.values()  # a tied head counted once

    def held(p: nn.Parameter) -> int:
        return p.nbytes if id(p) in whole else shard_bytes(p, shards)

    weights = sum(held(p) for p in params)
    weights += sum(b.nbytes for b in model.buffers())  # FSDP2 does not shard buffers
    trained = [p for p in params if p.requires_grad]
    grads = sum(held(p) for p in trained)
    return StateBytes(weights - quantized, grads, 2 * grads + STEP_BYTES * len(trained))


def shard_bytes(t: torch.Tensor, shards: int) -> int:
    """The bytes of the first of `shards` FSDP2 shards of `t`: ceil(rows / shards) rows."""
    if shards == 1 or t.dim() == 0:
        return t.nbytes
    rows = -(-t.shape[0] // shards)
    return rows * (t.numel() // max(t.shape[0], 1)) * t.element_size()
