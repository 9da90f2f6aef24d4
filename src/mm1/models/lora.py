"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) on the decoder's
linear layers, as LLaVA fine-tunes with `--lora_enable`: each target `nn.Linear` of the
decoder's blocks keeps its weight W (frozen) and gains an adapter, y = W x + b + s B A x with A
(r x in) and B (out x r), s = alpha / r. B starts at zero, so a model with fresh adapters
computes exactly what it did without them.

The adapted layer keeps W's and b's state-dict keys (`...q_proj.weight`); the adapter adds
`...q_proj.lora.a`, `.lora.b` and `.lora.scale` (s, kept so a checkpoint merges on its own).
Whatever reads a run's weights for inference or as a starting point gets them merged
(`merge_lora`: W + s B A), so evaluation, serving and conversion see a plain model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

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


def add_lora(decoder: nn.Module, cfg: LoRAConfig) -> int:
    """Give every `cfg.targets` linear layer inside `decoder.layers` an adapter, in place (its
    weight and bias the same parameters); the number adapted."""
    adapted = 0
    for parent in decoder.layers.modules():
        for name, child in list(parent.named_children()):
            if name not in cfg.targets or type(child) is not nn.Linear:
                continue
            layer = LoRALinear(
                child.in_features, child.out_features, bias=child.bias is not None, device="meta"
            )
            layer.weight, layer.bias = child.weight, child.bias
            layer.lora = LoRAAdapter(
                child.in_features,
                child.out_features,
                cfg.rank,
                cfg.alpha,
                cfg.dropout,
                device=child.weight.device,
            )
            setattr(parent, name, layer)
            adapted += 1
    return adapted


def add_decoder_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """`add_lora` on `model.decoder` (`train.lora`); a ConfigError when no layer matched."""
    from mm1.config import ConfigError

    adapted = add_lora(model.decoder, cfg)
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
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    line = (
        f"LoRA: {adapters} adapters (rank {cfg.rank}, alpha {cfg.alpha:g}) on "
        f"{', '.join(cfg.targets)}; {trained:,} of {total:,} parameters train "
        f"({trained / total:.2%})"
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
    in W's dtype) and its own keys gone: the plain model's state dict. In place."""
    for key in [k for k in state if k.endswith(".lora.a")]:
        layer = key.removesuffix(".lora.a")
        a, b = state.pop(key), state.pop(f"{layer}.lora.b")
        scale = state.pop(f"{layer}.lora.scale")
        w = state[f"{layer}.weight"]
        delta = scale.float() * (b.float() @ a.float())
        state[f"{layer}.weight"] = (w.float() + delta).to(w.dtype)
    return state
