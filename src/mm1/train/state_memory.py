"""The memory a run's model states take: its weights (NF4 codes for QLoRA's frozen weights),
a gradient per trained parameter and AdamW's two moments and step count for each, computed on a
model built on the meta device (`mm1 info`). Activations are not counted: they depend on the
batch, the sequence length and activation checkpointing."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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


def training_state_bytes(model: nn.Module, t: TrainConfig) -> StateBytes:
    """The model states of training `model` (built on the meta device; adapters are added to
    it in place) as `t` configures: which parts train, LoRA and its NF4 weights."""
    from mm1.models.lora import LoRALinear, add_decoder_lora
    from mm1.train.optim import set_trainable

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
    params = {id(p): p for p in model.parameters()}.values()  # a tied head counted once
    weights = sum(p.numel() * p.element_size() for p in params)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trained = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trained)
    return StateBytes(weights - quantized, grads, 2 * grads + STEP_BYTES * len(trained))
