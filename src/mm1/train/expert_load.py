"""Per-layer expert load of MoE decoders for the training log: the fraction of a step's top-k
assignments (routed, non-padding tokens) each expert received, summed over micro-batches and
ranks. Balanced routing gives 1 / E to every expert."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def last_expert_loads(model: nn.Module) -> dict[int, torch.Tensor]:
    """Decoder layer -> assignments per expert of the last training forward, for every module
    that records them (`last_load`, set by `mm1.models.moe.MoE`)."""
    out: dict[int, torch.Tensor] = {}
    for name, m in model.named_modules():
        load = getattr(m, "last_load", None)
        if isinstance(load, torch.Tensor) and (match := _LAYER.search(name)):
            out[int(match.group(1))] = load.detach()
    return out


def add_loads(total: dict[int, torch.Tensor], new: dict[int, torch.Tensor]) -> None:
    for layer, load in new.items():
        total[layer] = total[layer] + load if layer in total else load.clone()


def load_fractions(counts: dict[int, torch.Tensor], all_reduce_sum: Any) -> dict[int, list[float]]:
    """Each layer's per-expert share of its assignments, summed over ranks first
    (`all_reduce_sum`, in place on one stacked tensor: every rank has the same layers)."""
    if not counts:
        return {}
    layers = sorted(counts)
    stacked = torch.stack([counts[i].float() for i in layers])
    all_reduce_sum(stacked)
    shares = stacked / stacked.sum(-1, keepdim=True).clamp(min=1)
    return {i: row.tolist() for i, row in zip(layers, shares)}


def load_metrics(fractions: dict[int, list[float]]) -> dict[str, Any]:
    """`expert_load_l{i}` (the fractions, metrics.jsonl only) and its min / max (scalars, also
    in TensorBoard) per sparse layer."""
    out: dict[str, Any] = {}
    for i, shares in sorted(fractions.items()):
        out[f"expert_load_l{i}"] = [round(s, 6) for s in shares]
        out[f"expert_load_min_l{i}"] = min(shares)
        out[f"expert_load_max_l{i}"] = max(shares)
    return out
