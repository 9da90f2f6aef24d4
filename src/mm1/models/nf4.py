"""A frozen weight stored in 4-bit NormalFloat with double-quantized scalers, as QLoRA does
(Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023): blocks of 64 values
share one absmax scaler, and the scalers are themselves quantized to int8 in blocks of (up to)
256.
torchao's `NF4Tensor` quantizes and computes (`F.linear` dequantizes it to the input's dtype,
forward and backward); this module holds its parts as buffers, so a checkpoint saves the exact
codes the run trained against (quantizing a dequantized weight again does not give them back),
`.to()` moves them, and DDP is told to leave them out of its broadcasts (`parallelize`).

A run's readers get the weight dequantized (`dequantize_state`), in the dtype it was
quantized from.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64  # values per absmax scaler (QLoRA's); a weight's size must be a multiple of it
SCALER_BLOCK = 256  # scalers per int8 scale of the double quantization (QLoRA's), at most
BUFFERS = ("codes", "scalers", "scaler_factors", "scaler_mean", "levels", "shape")


def torchao_nf4() -> Any:
    """torchao's NF4 module, imported quietly (its GPU kernels fail to load on a CPU build and
    say so; NF4 is plain torch); a ConfigError naming the extra to install when it is absent."""
    try:
        quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
        levels = [log.level for log in quiet]
        for log in quiet:
            log.setLevel(logging.ERROR)
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
        finally:
            for log, level in zip(quiet, levels):
                log.setLevel(level)
    except ImportError as err:
        from mm1.config import ConfigError

        raise ConfigError(
            f"NF4 weights (train.lora.quantize=nf4) need torchao: pip install 'mm1[qlora]' ({err})"
        ) from err
    return nf4_tensor


def quantizable(weight_shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a weight of this shape splits into whole NF4 blocks."""
    return math.prod(weight_shape) % BLOCK == 0


def scaler_block_size(numel: int) -> int:
    """Scalers per double-quantization block for a weight of `numel` values: QLoRA's 256 where
    its scalers split into blocks of 256, else the largest number of them below that which
    does (192 x 192 weights: 576 scalers, blocks of 192); torchao needs whole blocks."""
    blocks = numel // BLOCK
    return max(n for n in range(1, SCALER_BLOCK + 1) if blocks % n == 0)


class NF4Weight(nn.Module):
    """A 2-d weight in NF4: its codes (two per byte), int8 scalers, their per-block factors and
    mean, the 16 levels (in the dtype the weight had) and its shape, as buffers."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        scalers = scaler_block_size(weight.numel())
        q = torchao_nf4().to_nf4(weight.detach().contiguous(), BLOCK, scalers)
        self.register_buffer("codes", q.quantized_data)
        self.register_buffer("scalers", q.quantized_scalers)
        self.register_buffer("scaler_factors", q.quantization_factor)
        self.register_buffer("scaler_mean", q.scaler_mean)
        self.register_buffer("levels", q.nf4)
        self.register_buffer("shape", torch.tensor(weight.shape, dtype=torch.int64))
        self.size = torch.Size(weight.shape)  # static for torch.compile (`shape` is data)

    def tensor(self) -> torch.Tensor:
        """The weight as torchao's NF4Tensor over these buffers (no copy)."""
        return nf4_from_parts({name: getattr(self, name) for name in BUFFERS}, self.size)

    # Outside torch.compile's graphs: dynamo gives the weights of a block's layers symbolic
    # sizes, which NF4Tensor cannot take. The rest of the block still compiles.
    @torch.compiler.disable
    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T + b, W dequantized to x's dtype (torchao's `F.linear`, forward and backward);
        b added in the product's dtype, as autocast's linear does (torchao's would promote a
        bf16 product to the fp32 bias's dtype)."""
        y = F.linear(x, self.tensor())
        return y if bias is None else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape.tolist())}, dtype={self.levels.dtype}"


def nf4_from_parts(parts: dict[str, torch.Tensor], shape: torch.Size | None = None) -> torch.Tensor:
    """torchao's NF4Tensor from `NF4Weight`'s buffers (a module's, or a state dict's)."""
    nf4 = torchao_nf4()
    shape = shape or torch.Size(parts["shape"].tolist())
    levels = parts["levels"]
    meta = nf4.SubclassTensorArgs(shape, (shape[1], 1), 0, levels.dtype, levels.device, False)
    blocks = shape.numel() // BLOCK
    return nf4.NF4Tensor(
        meta,
        BLOCK,
        blocks,
        blocks // parts["scaler_factors"].numel(),  # one factor per block of scalers
        parts["scalers"],
        parts["scaler_factors"],
        parts["scaler_mean"],
        parts["codes"],
        levels,
    )


@torch.no_grad()
def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each `NF4Weight`'s buffers (`LAYER.nf4.*`) replaced by the dense weight
    they hold (`LAYER.weight`, in the dtype it was quantized from). In place."""
    for key in [k for k in state if k.endswith(".nf4.codes")]:
        layer = key.removesuffix(".nf4.codes")
        parts = {name: state.pop(f"{layer}.nf4.{name}") for name in BUFFERS}
        state[f"{layer}.weight"] = nf4_from_parts(parts).get_original_weight()
    return state
