"""Sparse upcycling: a dense decoder's FFNs become the experts of a MoE decoder.

The state transform `upcycle_dense_ffns` (in the starting-weights chain, after ``vocabulary``)
fills each MoE layer the model expects from the dense FFN a source holds for that layer: every
expert a copy of it, the router small random weights. With the top-k weights renormalised,
identical experts sum to the dense FFN, so the upcycled model's outputs equal the dense one's
until training moves the experts apart; unnormalised top-k would scale each FFN by the chosen
probabilities' sum, so upcycling into it is refused. The random router spreads tokens over all
experts (its logits are small, so every expert is someone's top k). Optional relative Gaussian
noise on the experts' weights (`noise`, off by default) breaks their symmetry at the cost of
exact equality at the start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mm1.config import ModelConfig

if TYPE_CHECKING:  # state_transforms imports this module to register the transform
    from mm1.models.state_transforms import LoadContext, StateDict

ROUTER_STD = 0.02  # the upcycled router's initial weights: small, so routing starts near uniform
_EXPERTS_KEY = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$")


@dataclass(frozen=True)
class UpcycleOptions:
    noise: float = 0.0  # relative std of Gaussian noise on each expert's weights (0: exact copies)
    seed: int = 0  # the router's (and the noise's) random stream; the same on every rank


def _moe_spec(model: ModelConfig | None) -> object | None:
    from mm1.models.moe import MoEConfig  # the MoE layer imports the decoder: kept lazy

    ffn = None if model is None else model.decoder.ffn
    return ffn if isinstance(ffn, MoEConfig) else None


def upcycle_dense_ffns(state: StateDict, ctx: LoadContext) -> StateDict:
    """Each MoE layer of the model whose source holds a dense FFN instead: experts = copies of
    it (plus optional noise), router = small random weights."""
    layers = [
        int(m.group(1)) for k in ctx.expected if (m := _EXPERTS_KEY.match(k)) and k not in state
    ]
    ungated = [
        i
        for i in layers
        if f"decoder.layers.{i}.mlp.up_proj.weight" in state
        and f"decoder.layers.{i}.mlp.gate_proj.weight" not in state
    ]
    if ungated:
        raise ValueError(
            f"decoder layers {ungated} start from an ungated FFN (model.decoder.ffn.type=mlp, "
            "Persimmon's): mm1's experts are SwiGLU, so it cannot be upcycled into them"
        )
    layers = [i for i in layers if f"decoder.layers.{i}.mlp.gate_proj.weight" in state]
    if not layers:
        return state
    spec = _moe_spec(ctx.model)
    if spec is not None and not spec.norm_topk_prob:
        raise ValueError(
            "upcycling a dense FFN needs renormalised top-k weights "
            "(model.decoder.ffn.norm_topk_prob=true): unnormalised, the MoE's output at "
            "initialisation is not the dense model's"
        )
    opts = ctx.upcycle
    gen = torch.Generator().manual_seed(opts.seed)
    for i in layers:
        p = f"decoder.layers.{i}.mlp."
        gate, up, down = (state.pop(f"{p}{n}_proj.weight") for n in ("gate", "up", "down"))
        experts, _, dim = ctx.expected[f"{p}experts.gate_up_proj"]
        gate_up = torch.cat([gate, up]).expand(experts, -1, -1).clone()
        down = down.expand(experts, -1, -1).clone()
        if opts.noise:
            for w in (gate_up, down):
                w.mul_(1 + opts.noise * torch.randn(w.shape, generator=gen, dtype=w.dtype))
        state[f"{p}experts.gate_up_proj"] = gate_up
        state[f"{p}experts.down_proj"] = down
        router = torch.randn(experts, dim, generator=gen, dtype=gate.dtype) * ROUTER_STD
        state[f"{p}gate.weight"] = router
    noise = f", expert noise {opts.noise}" if opts.noise else ""
    ctx.notes.append(f"upcycled the dense FFNs of decoder layers {layers}{noise}")
    return state
