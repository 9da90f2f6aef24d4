"""Llama / Qwen2 / Qwen3 / Mistral / Persimmon decoders and Mixtral / Qwen3-MoE MoE decoders:
configs and weights from and to HF checkpoints (the MoE specifics in `mm1.models.hf.moe`,
Persimmon's in `mm1.models.hf.persimmon`); MoE decoders that fit
neither family as transformers custom code (`mm1_moe`, `mm1.models.hf.custom_moe`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm1.config import ROPE_TYPES, DecoderConfig, RopeScalingConfig
from mm1.models.decoder import Decoder
from mm1.models.hf.checkpoint import (
    KEY_MAPS,
    PathLike,
    checkpoint_dir,
    load_hf_state_dict,
    load_into,
    need,
    read_hf_config,
    write_checkpoint,
)
from mm1.models.hf.custom_moe import (
    CUSTOM_MOE_TYPE,
    copy_moe_code,
    custom_moe_config_from_hf,
    custom_moe_config_to_hf,
)
from mm1.models.hf.moe import (
    MOE_TYPES,
    UNSUPPORTED_MOE,
    fuse_experts,
    moe_config_to_hf,
    moe_from_hf,
    moe_type_for,
    split_experts,
)
from mm1.models.hf.persimmon import (
    persimmon_config_from_hf,
    persimmon_config_to_hf,
    persimmon_state_from_hf,
    persimmon_state_to_hf,
)
from mm1.models.moe import MoEConfig

DECODER_TYPES = ("llama", "qwen2", "qwen3", "mistral", "persimmon", *MOE_TYPES, CUSTOM_MOE_TYPE)
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "persimmon": "PersimmonForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    CUSTOM_MOE_TYPE: "MM1MoeForCausalLM",
}
# transformers' class defaults for max_position_embeddings.
_MAX_POSITIONS = {
    "llama": 2048,
    "qwen2": 32768,
    "qwen3": 32768,
    "mistral": 131072,
    "persimmon": 16384,
    "mixtral": 131072,
    "qwen3_moe": 32768,
}


def _rope_from_hf(
    hf: Mapping[str, Any], max_pos: int, partial: bool = False
) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling). transformers 4 keeps `rope_theta` at the top level and the scaling
    in `rope_scaling` (null when none, the type under `rope_type` or `type`); transformers 5
    folds both into `rope_parameters`. As in transformers 5, a non-null `rope_scaling` wins and
    a theta inside the dict wins over the top-level one."""
    rp = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, Mapping) for v in rp.values()):
        raise ValueError("rope_parameters per layer type are not supported")
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {kind!r} is not supported (mm1's decoder implements "
            f"{', '.join(ROPE_TYPES)})"
        )
    fraction = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(fraction) != 1.0 and not partial:  # persimmon reads it (`rope_fraction`)
        raise ValueError(f"partial_rotary_factor={fraction} is not supported")
    scaling = RopeScalingConfig(type=kind)
    if kind != "default":
        scaling.factor = float(need(rp, "factor", f"rope scaling {kind!r}"))
    if kind == "llama3":
        scaling.low_freq_factor = float(need(rp, "low_freq_factor", "rope scaling 'llama3'"))
        scaling.high_freq_factor = float(need(rp, "high_freq_factor", "rope scaling 'llama3'"))
        scaling.original_max_position_embeddings = int(
            rp.get("original_max_position_embeddings") or max_pos
        )
    return theta, scaling


def _sliding_window_from_hf(hf: Mapping[str, Any], model_type: str, layers: int) -> int:
    if model_type == "mistral":
        return int(hf.get("sliding_window", 4096) or 0)  # null = full attention
    if model_type == "mixtral":
        return int(hf.get("sliding_window") or 0)
    if model_type not in ("qwen2", "qwen3") or not hf.get("use_sliding_window", False):
        return 0  # Qwen2 / Qwen3 ignore their sliding_window unless use_sliding_window is set
    window = hf.get("sliding_window", 4096)
    # transformers slides the window on layers >= max_window_layers (or as layer_types says).
    types = hf.get("layer_types") or [
        "sliding_attention" if window and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(layers)
    ]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return 0
    if sliding != len(types):
        raise ValueError(
            f"this {model_type} config slides the attention window on {sliding} of {len(types)} layers "
            "(max_window_layers / layer_types); mm1's decoder uses one window for every layer"
        )
    return int(window or 0)


def decoder_config_from_hf(path_or_dict: PathLike | Mapping[str, Any]) -> DecoderConfig:
    """Our DecoderConfig for a Llama / Qwen2 / Qwen3 / Mistral / Mixtral / Qwen3-MoE config
    (transformers 4 or 5 layout), or an `mm1_moe` custom-code one (ours).

    `init` is left unset: the config describes the architecture only.
    """
    hf = read_hf_config(path_or_dict)
    mt = hf.get("model_type")
    if mt in UNSUPPORTED_MOE:
        raise ValueError(f"unsupported decoder model_type {mt!r}: {UNSUPPORTED_MOE[mt]}")
    if mt not in DECODER_TYPES:
        raise ValueError(
            f"unsupported decoder model_type {mt!r}; supported: {', '.join(DECODER_TYPES)}"
        )
    if mt == CUSTOM_MOE_TYPE:
        return custom_moe_config_from_hf(hf)
    if mt == "persimmon":
        max_pos = int(hf.get("max_position_embeddings") or _MAX_POSITIONS[mt])
        theta, scaling = _rope_from_hf(hf, max_pos, partial=True)
        return persimmon_config_from_hf(hf, need, theta, scaling)
    what = f"{mt} config"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: mm1's decoder has a SwiGLU (silu) FFN only")
    if mt == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        # Llama's attention_bias also puts a bias on o_proj, which our decoder does not have.
        raise ValueError("Llama attention_bias / mlp_bias are not supported by mm1's decoder")
    if mt in ("qwen3", "qwen3_moe") and hf.get("attention_bias"):
        # Qwen3's attention_bias puts a bias on o_proj too, which our decoder does not have.
        raise ValueError(f"attention_bias=true: {mt}'s o_proj bias is not supported")
    heads = int(need(hf, "num_attention_heads", what))
    layers = int(need(hf, "num_hidden_layers", what))
    max_pos = int(hf.get("max_position_embeddings") or _MAX_POSITIONS[mt])
    theta, scaling = _rope_from_hf(hf, max_pos)
    cfg = DecoderConfig(
        vocab_size=int(need(hf, "vocab_size", what)),
        dim=int(need(hf, "hidden_size", what)),
        layers=layers,
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        # Qwen3Config defaults head_dim to 128 (a config saved as a diff leaves it out); the
        # others, Qwen3-MoE included, default it to hidden / heads (0 here).
        head_dim=int(hf.get("head_dim") or (128 if mt == "qwen3" else 0)),
        ffn_dim=int(need(hf, "intermediate_size", what)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_pos,
        qkv_bias=mt == "qwen2",  # Qwen2 always has q/k/v biases (and no o_proj bias)
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window_from_hf(hf, mt, layers),
        qk_norm=mt in ("qwen3", "qwen3_moe"),
    )
    if mt in MOE_TYPES:
        cfg.ffn = moe_from_hf(hf, mt, layers)
    return cfg


def decoder_hf_state(path: PathLike) -> dict[str, torch.Tensor]:
    """A decoder checkpoint's tensors (checkpoint names), a MoE's experts fused into our layout."""
    d = checkpoint_dir(path)
    state = load_hf_state_dict(d)
    hf = read_hf_config(d)
    if hf.get("model_type") in MOE_TYPES:
        state = fuse_experts(state, str(d))
    if hf.get("model_type") == "persimmon":
        state = persimmon_state_from_hf(state, int(need(hf, "num_attention_heads", str(d))))
    return state


def decoder_ignored(cfg: DecoderConfig) -> Callable[[str], bool]:
    """Which of a checkpoint's keys (our names) a decoder of `cfg` leaves out."""

    def ignore(k: str) -> bool:
        # Old conversions saved the rotary buffer (we recompute it); a tied head is the embedding.
        return k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight")

    return ignore


def decoder_from_hf(path: PathLike, *, dtype: torch.dtype | None = torch.float32) -> Decoder:
    """A Decoder with a Llama / Qwen2 / Qwen3 / Mistral checkpoint's weights; its logits on input ids
    (B, T) equal transformers' AutoModelForCausalLM. A tied checkpoint may omit lm_head.weight.
    `dtype` casts floating weights (None keeps the checkpoint's)."""
    d = checkpoint_dir(path)
    cfg = decoder_config_from_hf(d)
    state = decoder_hf_state(d)
    with torch.device("meta"):
        model = Decoder(cfg)

    load_into(model, state, KEY_MAPS["decoder"], decoder_ignored(cfg), {}, dtype, str(d))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the embedding
    model.init_buffers()  # non-persistent: still on the meta device after the assignment
    return model


def decoder_config_to_hf(cfg: DecoderConfig, model_type: str = "llama") -> dict[str, Any]:
    """A transformers config dict of `model_type` for our DecoderConfig; errors name what the
    family cannot express."""
    if model_type not in DECODER_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(DECODER_TYPES)}")
    if model_type == "persimmon":
        return persimmon_config_to_hf(cfg)
    persimmon_only = [
        key
        for key, used in (
            ("decoder.norm=layer", cfg.norm != "rms"),
            ("decoder.o_bias", cfg.o_bias),
            ("decoder.rope_fraction", cfg.rope_fraction != 1.0),
            ("decoder.ffn.type=mlp", cfg.ffn_type == "mlp"),
        )
        if used
    ]
    if persimmon_only:
        where = (
            "no MoE family (nor mm1_moe) has them"
            if isinstance(cfg.ffn, MoEConfig)
            else "of transformers' decoders persimmon has them"
        )
        raise ValueError(f"{model_type} has no {', '.join(persimmon_only)}; {where}")
    if model_type == CUSTOM_MOE_TYPE:
        return custom_moe_config_to_hf(cfg)
    moe = moe_config_to_hf(cfg, model_type) if model_type in MOE_TYPES else {}
    if cfg.qk_norm and cfg.qkv_bias and not moe:
        raise ValueError(
            "no transformers decoder family has both a q/k norm and q/k/v biases "
            "(decoder.qk_norm, decoder.qkv_bias)"
        )
    if cfg.qk_norm and model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"{model_type} has no q/k norm (decoder.qk_norm); use qwen3")
    if not cfg.qk_norm and model_type == "qwen3":
        raise ValueError("qwen3 always has a q/k norm; decoder.qk_norm is false: use llama")
    if cfg.ffn_type != "swiglu" and not moe:
        raise ValueError(f"{model_type} has a SwiGLU FFN, not {cfg.ffn_type!r}")
    if cfg.qkv_bias and model_type != "qwen2":
        raise ValueError(f"{model_type} has no q/k/v-only biases (decoder.qkv_bias); use qwen2")
    if cfg.sliding_window and model_type == "llama":
        raise ValueError("llama has no sliding window (decoder.sliding_window); use mistral")
    rs = cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": rs.type, "rope_theta": cfg.rope_theta}
    if rs.type != "default":
        rope["factor"] = rs.factor
    if rs.type == "llama3":
        rope["low_freq_factor"] = rs.low_freq_factor
        rope["high_freq_factor"] = rs.high_freq_factor
        rope["original_max_position_embeddings"] = rs.original_max_position_embeddings
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        # transformers 5 reads rope_parameters; transformers 4 reads rope_theta + rope_scaling.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None
        if rs.type == "default"
        else {k: v for k, v in rope.items() if k != "rope_theta"},
    }
    window = cfg.sliding_window or None
    if moe:
        hf.update(moe)
    elif model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        hf["sliding_window"] = window
    else:
        kind = "sliding_attention" if window else "full_attention"
        if model_type == "qwen3":
            hf["attention_bias"] = False
        hf.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window else cfg.layers,
            layer_types=[kind] * cfg.layers,
        )
    return hf


def save_decoder_hf(decoder: Decoder, out_dir: PathLike, model_type: str | None = None) -> Path:
    """Write a (plain, unsharded) Decoder as a transformers `model_type` checkpoint
    (config.json + model.safetensors) that AutoModelForCausalLM loads with equal logits.
    None: `default_decoder_type`. `mm1_moe` is custom code: `modeling_mm1_moe.py` is written
    beside it (load with trust_remote_code=True).

    A tied head is not written (transformers re-ties it). Written as qwen2, a decoder without
    q/k/v biases gets zero biases, since Qwen2 always has them.
    """
    hf, tensors = decoder_to_hf(decoder, model_type)
    hf["dtype"] = str(decoder.embed_tokens.weight.dtype).removeprefix("torch.")
    out = write_checkpoint(out_dir, hf, tensors)
    if hf["model_type"] == CUSTOM_MOE_TYPE:
        copy_moe_code(out)
    return out


def default_decoder_type(cfg: DecoderConfig) -> str:
    """For a dense decoder the family that expresses it: qwen3 with a q/k norm, qwen2 with
    q/k/v biases, mistral with a sliding window, else llama; for a MoE one the family it fits
    exactly (`moe_type_for`), else `mm1_moe` (custom code)."""
    if not isinstance(cfg.ffn, MoEConfig):
        if cfg.norm == "layer" or cfg.ffn_type == "mlp" or cfg.o_bias or cfg.rope_fraction != 1:
            return "persimmon"  # its config error says what else it needs
        if cfg.qk_norm:
            return "qwen3"
        if cfg.qkv_bias:
            return "qwen2"
        return "mistral" if cfg.sliding_window else "llama"
    try:
        return moe_type_for(cfg)
    except ValueError:
        return CUSTOM_MOE_TYPE


def decoder_to_hf(
    decoder: Decoder, model_type: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors under checkpoint names) of `decoder` as a transformers
    `model_type` causal LM, as `save_decoder_hf` writes them (None: `default_decoder_type`)."""
    cfg = decoder.cfg
    if model_type is None:
        model_type = default_decoder_type(cfg)
    hf = decoder_config_to_hf(cfg, model_type)
    state = dict(decoder.state_dict())
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    if model_type == "qwen2" and not cfg.qkv_bias:
        for i, layer in enumerate(decoder.layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                proj: nn.Linear = getattr(layer.self_attn, name)
                state[f"layers.{i}.self_attn.{name}.bias"] = proj.weight.new_zeros(
                    proj.out_features
                )
    keymap = KEY_MAPS["decoder"]
    tensors = {keymap.to_hf(k): v for k, v in state.items()}
    if model_type in MOE_TYPES:
        tensors = split_experts(tensors, model_type)
    if model_type == "persimmon":
        tensors = persimmon_state_to_hf(tensors, cfg.heads)
    return hf, tensors
