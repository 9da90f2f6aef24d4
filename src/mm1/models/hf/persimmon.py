"""Persimmon decoders (transformers' `PersimmonForCausalLM`, Fuyu-8B's text model): the config
and the weights to and from mm1's decoder with Persimmon's switches (`norm: layer`,
`rope_fraction`, `o_bias`, q/k LayerNorm, `ffn: {type: mlp, activation: relu2}`).

Persimmon fuses q, k and v into one `query_key_value` projection whose output is laid out per
head as (q, k, v) x head_dim; mm1 keeps three projections, so the fused weight is split on the
way in and put back together on the way out. The other names map one to one. The converters work
on checkpoint names with Llama's renames undone (`model.layers.i.self_attn.q_proj...`), so the
decoder's key table reads the result like any other family's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mm1.config import DecoderConfig, RopeScalingConfig

# Persimmon's module names -> Llama's (which mm1's decoder uses), within a layer or the model.
_RENAMES = (
    (".self_attn.dense.", ".self_attn.o_proj."),
    (".self_attn.q_layernorm.", ".self_attn.q_norm."),
    (".self_attn.k_layernorm.", ".self_attn.k_norm."),
    (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
    (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
    ("model.final_layernorm.", "model.norm."),
)
_FUSED = ".self_attn.query_key_value."
# transformers' activation names <-> mm1's (`mm1.config.ACTIVATIONS`).
_ACT_FROM_HF = {
    "relu2": "relu2",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
    "quick_gelu": "quick_gelu",
}
_ACT_TO_HF = {
    "relu2": "relu2",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "quick_gelu": "quick_gelu",
}
# transformers' PersimmonConfig defaults, for configs that leave a key out.
_DEFAULTS: dict[str, Any] = {
    "hidden_act": "relu2",
    "layer_norm_eps": 1e-5,
    "qk_layernorm": True,
    "max_position_embeddings": 16384,
    "partial_rotary_factor": 0.5,
}


def _get(hf: Mapping[str, Any], key: str) -> Any:
    return hf[key] if hf.get(key) is not None else _DEFAULTS[key]


def persimmon_config_from_hf(
    hf: Mapping[str, Any], need: Any, theta: float, scaling: RopeScalingConfig
) -> DecoderConfig:
    """Our DecoderConfig for a persimmon config.json (`theta` / `scaling` as the caller read
    them; `need(hf, key, what)` raises for a missing key)."""
    if scaling.type != "default":
        raise ValueError(
            f"rope_scaling / rope_parameters type {scaling.type!r}: mm1 reads persimmon "
            "decoders without rope scaling"
        )
    act = str(_get(hf, "hidden_act"))
    if act not in _ACT_FROM_HF:
        raise ValueError(f"hidden_act={act!r}: mm1's mlp FFN has {', '.join(sorted(_ACT_FROM_HF))}")
    what = "persimmon config"
    dim = int(need(hf, "hidden_size", what))
    heads = int(need(hf, "num_attention_heads", what))
    rp = hf.get("rope_parameters") or {}
    fraction = float(rp.get("partial_rotary_factor") or _get(hf, "partial_rotary_factor"))
    return DecoderConfig(
        vocab_size=int(need(hf, "vocab_size", what)),
        dim=dim,
        layers=int(need(hf, "num_hidden_layers", what)),
        heads=heads,
        kv_heads=heads,
        ffn_dim=int(need(hf, "intermediate_size", what)),
        ffn={"type": "mlp", "activation": _ACT_FROM_HF[act], "bias": True},
        norm="layer",
        norm_eps=float(_get(hf, "layer_norm_eps")),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_fraction=fraction,
        max_seq_len=int(_get(hf, "max_position_embeddings")),
        qk_norm=bool(_get(hf, "qk_layernorm")),
        qkv_bias=True,
        o_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _ffn_option(cfg: DecoderConfig, name: str, default: Any) -> Any:
    ffn = cfg.ffn  # parsed (MLPConfig) once a Decoder was built, a mapping before
    return ffn.get(name, default) if isinstance(ffn, Mapping) else getattr(ffn, name, default)


def persimmon_mismatch(cfg: DecoderConfig) -> str | None:
    """What keeps `cfg` from being a Persimmon decoder (None: nothing)."""
    checks = (
        (cfg.norm == "layer", "model.decoder.norm=layer"),
        (
            cfg.kv_heads == cfg.heads,
            f"model.decoder.kv_heads={cfg.heads} (= heads: no grouped-query attention)",
        ),
        (not cfg.head_dim or cfg.head_dim * cfg.heads == cfg.dim, "head_dim = dim / heads"),
        (cfg.qkv_bias and cfg.o_bias, "model.decoder.qkv_bias and o_bias"),
        (
            cfg.ffn_type == "mlp" and _ffn_option(cfg, "bias", True),
            "model.decoder.ffn.type=mlp with biases",
        ),
        (not cfg.sliding_window, "no sliding window"),
        (cfg.rope_scaling.type == "default", "no rope scaling"),
    )
    missing = [need for ok, need in checks if not ok]
    return "persimmon needs " + ", ".join(missing) if missing else None


def persimmon_config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """A transformers PersimmonConfig dict (4 and 5 layouts) for `cfg`; a ValueError says what
    Persimmon cannot express."""
    why = persimmon_mismatch(cfg)
    if why:
        raise ValueError(why)
    act = _ffn_option(cfg, "activation", "relu2")
    if act not in _ACT_TO_HF:
        raise ValueError(f"model.decoder.ffn.activation={act!r} has no transformers name")
    rope = {
        "rope_type": "default",
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": cfg.rope_fraction,
    }
    return {
        "architectures": ["PersimmonForCausalLM"],
        "model_type": "persimmon",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "hidden_act": _ACT_TO_HF[act],
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.norm_eps,
        "qk_layernorm": cfg.qk_norm,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": cfg.rope_fraction,
        "rope_scaling": None,
    }


def persimmon_state_from_hf(
    state: Mapping[str, torch.Tensor], heads: int
) -> dict[str, torch.Tensor]:
    """A Persimmon checkpoint's tensors under Llama's names, q / k / v split per head."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _FUSED in key:
            head, kind = key.split(_FUSED)
            per_head = value.reshape(heads, 3, -1, *value.shape[1:])
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                part = per_head[:, i].reshape(-1, *value.shape[1:])
                out[f"{head}.self_attn.{name}.{kind}"] = part
            continue
        for theirs, ours in _RENAMES:
            key = key.replace(theirs, ours)
        out[key] = value
    return out


def persimmon_state_to_hf(
    tensors: Mapping[str, torch.Tensor], heads: int
) -> dict[str, torch.Tensor]:
    """Tensors under Llama's names (a decoder with Persimmon's switches) as Persimmon's:
    q / k / v fused per head."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if ".self_attn.q_proj." in key:
            head, kind = key.split(".self_attn.q_proj.")
            parts = [
                tensors[f"{head}.self_attn.{n}.{kind}"].reshape(heads, 1, -1, *value.shape[1:])
                for n in ("q_proj", "k_proj", "v_proj")
            ]
            out[f"{head}{_FUSED}{kind}"] = torch.cat(parts, 1).reshape(-1, *value.shape[1:])
            continue
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        for theirs, ours in _RENAMES:
            key = key.replace(ours, theirs)
        out[key] = value
    return out
