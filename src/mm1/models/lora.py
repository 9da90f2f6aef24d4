"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) on the decoder's
linear layers, as LLaVA fine-tunes with `--lora_enable`: each target `nn.Linear` of the
decoder's blocks keeps its weight W (frozen) and gains an adapter, y = W x + b + s B A x with A
(r x in) and B (out x r), s = alpha / r. B starts at zero, so a model with fresh adapters
computes exactly what it did without them.

The adapted layer keeps W's and b's state-dict keys (`...q_proj.weight`); the adapter adds
`...q_proj.lora.a`, `.lora.b` and `.lora.scale` (s, kept so a checkpoint merges on its own).
Whatever reads a run's weights for inference or as a starting point gets them merged
(`merge_lora`: W + s B A), so evaluation, serving and conversion see a plain model.

QLoRA (`quantize="nf4"`): W is stored in 4-bit NormalFloat (`NF4LoRALinear`, its `nf4` buffers
in place of `weight`) and the adapters train against that; merging dequantizes it first.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mm1.models.nf4 import BLOCK, NF4Weight, dequantize_state, quantizable

if TYPE_CHECKING:
    from mm1.config import LoRAConfig


class LoRAAdapter(nn.Module):
    """s B A x: A (rank x in) starts as nn.Linear's weights do, B (out x rank) at zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.a = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.b = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.register_buffer("scale", torch.empty((), device=device))
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self, std: float = 0.0) -> None:
        """(Also after `to_empty` on a meta-built model: `layers.init_weights` calls it.)

        A is drawn whole by the first rank, which sends each rank its shard: drawn shard by
        shard, an FSDP2-sharded A repeats rows across ranks on a CPU mesh (DTensor has no RNG
        tracker there; the ranks' streams need not even agree), and with B at zero repeated
        rows get equal updates forever, leaving rank / world_size."""
        a = self.a
        if isinstance(a, DTensor):
            full = torch.empty(a.shape, device=a.to_local().device, dtype=a.dtype)
            nn.init.kaiming_uniform_(full, a=math.sqrt(5))
            mine = distribute_tensor(full, a.device_mesh, a.placements, src_data_rank=0)
            a.to_local().copy_(mine.to_local())
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.b)
        self.scale.fill_(self.alpha / self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        return F.linear(F.linear(x, self.a), self.b) * self.scale


class LoRALinear(nn.Linear):
    """An `nn.Linear` with an adapter beside its weight."""

    lora: LoRAAdapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora(x)


class NF4LoRALinear(LoRALinear):
    """QLoRA's layer: the frozen weight in NF4 (`nf4`, no `weight` parameter), dequantized to
    the input's dtype for each product, forward and backward (torchao's `F.linear`)."""

    nf4: NF4Weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nf4.linear(x, self.bias) + self.lora(x)


def add_lora(
    decoder: nn.Module, cfg: LoRAConfig, quantize_on: torch.device | str | None = None
) -> int:
    """Give every `cfg.targets` linear layer inside `decoder.layers` an adapter, in place (its
    weight and bias the same parameters, or with `cfg.quantize="nf4"` its weight quantized);
    the number adapted. A ConfigError names a layer NF4 cannot quantize, before any changed.
    NF4 weights are quantized on `quantize_on` (default: where the weight is) and stay there:
    the training device, which quantizes a 7B decoder in seconds where a CPU core takes
    minutes."""
    from mm1.config import ConfigError

    nf4 = cfg.quantize == "nf4"
    targets = [
        (path, parent, name, child)
        for path, parent in decoder.layers.named_modules()
        for name, child in parent.named_children()
        if name in cfg.targets and type(child) is nn.Linear
    ]
    for path, _, name, child in targets:
        if nf4 and not quantizable(child.weight.shape):
            raise ConfigError(
                f"train.lora.quantize=nf4: layers.{path}.{name}'s weight "
                f"{tuple(child.weight.shape)} is not a multiple of {BLOCK} values (NF4's "
                "blocks); leave it out of train.lora.targets or set train.lora.quantize=none"
            )
    for _, parent, name, child in targets:
        kind = NF4LoRALinear if nf4 else LoRALinear
        layer = kind(
            child.in_features, child.out_features, bias=child.bias is not None, device="meta"
        )
        if nf4:
            layer.register_parameter("weight", None)
            layer.nf4 = NF4Weight(child.weight.to(quantize_on or child.weight.device))
        else:
            layer.weight = child.weight
        layer.bias = child.bias
        layer.lora = LoRAAdapter(
            child.in_features,
            child.out_features,
            cfg.rank,
            cfg.alpha,
            cfg.dropout,
            device=child.weight.device,
        )
        setattr(parent, name, layer)
    return len(targets)


def add_decoder_lora(
    model: nn.Module, cfg: LoRAConfig, quantize_on: torch.device | str | None = None
) -> int:
    """`add_lora` on `model.decoder` (`train.lora`); a ConfigError when no layer matched."""
    from mm1.config import ConfigError

    adapted = add_lora(model.decoder, cfg, quantize_on)
    if not adapted:
        raise ConfigError(
            f"train.lora.targets={list(cfg.targets)}: no such linear layer in this decoder's "
            "blocks (a MoE layer's experts are not nn.Linear layers)"
        )
    return adapted


def lora_summary(model: nn.Module, adapters: int, cfg: LoRAConfig, new_tokens: int = 0) -> str:
    """A line on what trains: the adapters and the parameters that train, of all; a warning
    for `new_tokens` (the tokenizer's added tokens), whose embedding rows stay as they
    started, the embeddings and the head being frozen."""
    quantized = [m for m in model.modules() if isinstance(m, NF4Weight)]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(int(m.shape.prod()) for m in quantized)
    line = (
        f"LoRA: {adapters} adapters (rank {cfg.rank}, alpha {cfg.alpha:g}) on "
        f"{', '.join(cfg.targets)}; {trained:,} of {total:,} parameters train "
        f"({trained / total:.2%})"
    )
    if quantized:
        stored = sum(b.nbytes for m in quantized for b in m.buffers())
        dense = sum(int(m.shape.prod()) * m.levels.element_size() for m in quantized)
        dtype = str(quantized[0].levels.dtype).removeprefix("torch.")
        line += (
            f"\nNF4: the adapted layers' frozen weights take {stored / 2**20:,.2f} MiB "
            f"({dense / 2**20:,.2f} MiB in {dtype})"
        )
    if new_tokens:
        line += (
            f"\nwarning: {new_tokens} token(s) new to the tokenizer keep their starting embedding "
            "(the mean row): LoRA freezes the embeddings and the head"
        )
    return line


@torch.no_grad()
def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each adapter folded into its layer's weight (W + s B A, in fp32, stored
    in W's dtype) and its own keys gone: the plain model's state dict, NF4 weights
    dequantized (QLoRA). In place."""
    dequantize_state(state)
    for key in [k for k in state if k.endswith(".lora.a")]:
        layer = key.removesuffix(".lora.a")
        a, b = state.pop(key), state.pop(f"{layer}.lora.b")
        scale = state.pop(f"{layer}.lora.scale")
        w = state[f"{layer}.weight"]
        delta = scale.float() * (b.float() @ a.float())
        state[f"{layer}.weight"] = (w.float() + delta).to(w.dtype)
    return state
