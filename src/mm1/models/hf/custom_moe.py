"""MoE decoders that fit neither Mixtral nor Qwen3-MoE (e.g. experts every 2nd layer without
q/k norm) as transformers custom code: `model_type: mm1_moe`, config.json with `auto_map`
pointing at `modeling_mm1_moe.py` (copied from `models/hf/remote/`, torch and transformers
only), loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

The weights keep our checkpoint names (`model.layers.{i}.mlp.experts.gate_up_proj` fused, as we
hold them); the config keeps every option of our DecoderConfig but how attention is computed,
so it reads back as the same decoder (`train.init.decoder`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mm1.config import ROPE_TYPES, DecoderConfig, RopeScalingConfig
from mm1.models.hf.checkpoint import need
from mm1.models.moe import MoEConfig

CUSTOM_MOE_TYPE = "mm1_moe"
REMOTE_MOE_CODE = Path(__file__).parent / "remote" / "modeling_mm1_moe.py"
MOE_AUTO_MAP = {
    "AutoConfig": "modeling_mm1_moe.MM1MoeConfig",
    "AutoModelForCausalLM": "modeling_mm1_moe.MM1MoeForCausalLM",
}
_LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def custom_moe_config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """The `mm1_moe` config.json of a MoE decoder; a dense one is an error naming the key."""
    moe = cfg.ffn
    if not isinstance(moe, MoEConfig):
        raise ValueError(
            f"{CUSTOM_MOE_TYPE} is a MoE decoder; model.decoder.ffn is {cfg.ffn_type!r}"
        )
    rs = cfg.rope_scaling
    rope: dict[str, Any] = {"type": rs.type, "theta": cfg.rope_theta}
    if rs.type != "default":
        rope["factor"] = rs.factor
    if rs.type == "llama3":
        rope.update({k: getattr(rs, k) for k in _LLAMA3_KEYS})
    return {
        "architectures": ["MM1MoeForCausalLM"],
        "auto_map": dict(MOE_AUTO_MAP),
        "model_type": CUSTOM_MOE_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope": rope,
        "max_position_embeddings": cfg.max_seq_len,
        "qk_norm": cfg.qk_norm,
        "qkv_bias": cfg.qkv_bias,
        "attention_window": cfg.sliding_window,
        "num_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        "decoder_sparse_step": moe.every,
        "moe_intermediate_size": moe.expert_dim or cfg.ffn_dim,
        "norm_topk_prob": moe.norm_topk_prob,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def custom_moe_config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
    """Our DecoderConfig for an `mm1_moe` config.json (`init` unset, attention `auto`)."""
    what = f"{CUSTOM_MOE_TYPE} config"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: mm1's experts are SwiGLU (silu)")
    rope = dict(hf.get("rope") or {})
    kind = rope.get("type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope.type={kind!r} is not one of {', '.join(ROPE_TYPES)}")
    scaling = RopeScalingConfig(type=kind)
    if kind != "default":
        scaling.factor = float(need(rope, "factor", f"{what} rope"))
    if kind == "llama3":
        for key in _LLAMA3_KEYS:
            setattr(scaling, key, type(getattr(scaling, key))(need(rope, key, f"{what} rope")))
    heads = int(need(hf, "num_attention_heads", what))
    ffn_dim = int(need(hf, "intermediate_size", what))
    expert_dim = int(hf.get("moe_intermediate_size") or ffn_dim)
    return DecoderConfig(
        vocab_size=int(need(hf, "vocab_size", what)),
        dim=int(need(hf, "hidden_size", what)),
        layers=int(need(hf, "num_hidden_layers", what)),
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or 0),
        ffn_dim=ffn_dim,
        ffn=MoEConfig(
            experts=int(need(hf, "num_experts", what)),
            top_k=int(need(hf, "num_experts_per_tok", what)),
            every=int(hf.get("decoder_sparse_step", 1)),
            expert_dim=0 if expert_dim == ffn_dim else expert_dim,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        ),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings") or 4096),
        qk_norm=bool(hf.get("qk_norm", False)),
        qkv_bias=bool(hf.get("qkv_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=int(hf.get("attention_window") or 0),
    )


def copy_moe_code(out_dir: str | Path) -> None:
    """Put `modeling_mm1_moe.py` beside an export's config.json."""
    shutil.copyfile(REMOTE_MOE_CODE, Path(out_dir) / REMOTE_MOE_CODE.name)
