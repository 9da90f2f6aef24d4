"""Mixtral and Qwen3-MoE decoders: their MoE settings and expert weights, from and to HF.

transformers 5 holds experts fused in memory (`experts.gate_up_proj` (E, 2F, D) and
`experts.down_proj` (E, D, F), our layout) but its `save_pretrained` writes them one expert at a
time, as transformers 4 did: Mixtral `block_sparse_moe.experts.{e}.w1 / w3 / w2` (gate / up /
down), Qwen3-MoE `mlp.experts.{e}.gate_proj / up_proj / down_proj`. Both are read; we write the
per-expert form, which both transformers versions load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mm1.config import DecoderConfig
from mm1.models.moe import MoEConfig

MOE_TYPES = ("mixtral", "qwen3_moe")
# MoE families whose checkpoints we recognise but do not load, and why.
UNSUPPORTED_MOE = {
    "qwen2_moe": "Qwen2-MoE has shared experts beside the routed ones: a different model type",
    "qwen3_next": "Qwen3-Next has shared experts and linear attention: a different model type",
    "deepseek_v3": "DeepSeek-V3 has shared experts and grouped routing: a different model type",
}

_PER_EXPERT = re.compile(
    r"^(?P<layer>(?:model\.)?layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
    r"(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up"}
_PART["down_proj"] = "down"


def moe_from_hf(hf: Mapping[str, Any], model_type: str, layers: int) -> MoEConfig:
    """The MoE layer options of a Mixtral / Qwen3-MoE config; features we do not implement are
    errors naming their key."""
    jitter = float(hf.get("router_jitter_noise") or 0.0)
    if jitter:
        raise ValueError(
            f"router_jitter_noise={jitter}: training-time router jitter is not supported"
        )
    if model_type == "mixtral":  # experts in every layer, top-k always renormalised
        return MoEConfig(
            experts=int(hf.get("num_local_experts", 8)),
            top_k=int(hf.get("num_experts_per_tok", 2)),
            every=1,
            norm_topk_prob=True,
        )
    if hf.get("mlp_only_layers"):
        raise ValueError(
            f"mlp_only_layers={hf['mlp_only_layers']}: dense layers outside the "
            "decoder_sparse_step pattern are not supported"
        )
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true: Qwen3-MoE's sliding window is not supported")
    every = int(hf.get("decoder_sparse_step", 1))
    if not 1 <= every <= layers:
        raise ValueError(f"decoder_sparse_step={every} leaves no sparse layer of {layers}")
    return MoEConfig(
        # transformers 5 writes num_local_experts (an alias), transformers 4 num_experts
        experts=int(hf.get("num_experts") or hf.get("num_local_experts") or 128),
        top_k=int(hf.get("num_experts_per_tok", 8)),
        every=every,
        expert_dim=int(hf.get("moe_intermediate_size", 768)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def moe_type_for(cfg: DecoderConfig) -> str:
    """The HF family a MoE decoder fits exactly: Mixtral (experts in every layer, renormalised,
    no q/k norm), else Qwen3-MoE (q/k norm); an error saying what fits neither."""
    moe = cfg.ffn
    if cfg.qkv_bias:
        raise ValueError("neither Mixtral nor Qwen3-MoE has q/k/v-only biases (decoder.qkv_bias)")
    expert_dim = moe.expert_dim or cfg.ffn_dim
    if not cfg.qk_norm and moe.every == 1 and moe.norm_topk_prob and expert_dim == cfg.ffn_dim:
        return "mixtral"
    if cfg.qk_norm and not cfg.sliding_window:
        return "qwen3_moe"
    raise ValueError(
        "this MoE decoder fits neither Mixtral (experts in every layer, renormalised top-k, "
        "no q/k norm) nor Qwen3-MoE (q/k norm, no sliding window)"
    )


def moe_config_to_hf(cfg: DecoderConfig, model_type: str) -> dict[str, Any]:
    """The MoE keys of a Mixtral / Qwen3-MoE config.json; errors say what does not fit."""
    moe = cfg.ffn
    if not isinstance(moe, MoEConfig):
        raise ValueError(f"{model_type} is a MoE decoder, this one has a {cfg.ffn_type!r} FFN")
    if model_type == "mixtral":
        if moe_type_for(cfg) != "mixtral":
            raise ValueError(
                "mixtral needs experts in every layer (ffn.every=1), renormalised top-k, "
                "experts as wide as decoder.ffn_dim and no q/k norm"
            )
        return {
            "num_local_experts": moe.experts,
            "num_experts_per_tok": moe.top_k,
            "router_jitter_noise": 0.0,
            "sliding_window": cfg.sliding_window or None,
            "output_router_logits": False,
        }
    if not cfg.qk_norm or cfg.sliding_window or cfg.qkv_bias:
        raise ValueError("qwen3_moe needs q/k norm, no sliding window and no q/k/v biases")
    return {
        "num_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        "decoder_sparse_step": moe.every,
        "moe_intermediate_size": moe.expert_dim or cfg.ffn_dim,
        "norm_topk_prob": moe.norm_topk_prob,
        "mlp_only_layers": [],
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "output_router_logits": False,
    }


def fuse_experts(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's per-expert weights stacked into the fused layout (fused ones pass), and
    Mixtral's `block_sparse_moe` module named `mlp` as ours."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for key, value in state.items():
        m = _PER_EXPERT.match(key)
        if m is None:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = value
            continue
        experts.setdefault(m["layer"], {})[int(m["e"]), _PART[m["w"]]] = value
    for layer, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        missing = [
            f"{e}.{p}" for e in range(n) for p in ("gate", "up", "down") if (e, p) not in parts
        ]
        if missing:
            raise ValueError(f"{source}: {layer} lacks expert weights {missing[:3]}")
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(n)]
        )
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([parts[e, "down"] for e in range(n)])
    return out


def split_experts(state: Mapping[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Our fused experts (checkpoint names) as the per-expert weights `model_type` writes."""
    out: dict[str, torch.Tensor] = {}
    fused = re.compile(r"^(.*layers\.\d+)\.mlp\.experts\.gate_up_proj$")
    for key, value in state.items():
        if key.endswith(".mlp.experts.down_proj"):
            continue
        m = fused.match(key)
        if m is None:
            if model_type == "mixtral":
                key = key.replace(".mlp.", ".block_sparse_moe.")
            out[key] = value
            continue
        layer, down = m[1], state[f"{m[1]}.mlp.experts.down_proj"]
        gate, up = value.chunk(2, dim=1)
        for e in range(value.shape[0]):
            if model_type == "mixtral":
                base = f"{layer}.block_sparse_moe.experts.{e}"
                names = {"w1": gate[e], "w3": up[e], "w2": down[e]}
            else:
                base = f"{layer}.mlp.experts.{e}"
                names = {"gate_proj": gate[e], "up_proj": up[e], "down_proj": down[e]}
            for name, w in names.items():
                out[f"{base}.{name}.weight"] = w
    return out
