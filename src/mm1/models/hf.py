"""Hugging Face checkpoints in and out: CLIP / SigLIP image encoders, Llama / Qwen2 / Mistral decoders.

transformers is an optional dependency, so nothing here imports it: `config.json` is read with
json and the weights with safetensors, or with `torch.load(weights_only=True)` for
`pytorch_model.bin` (that unpickler only rebuilds tensors and containers; it never runs code).
Each family has one key table (`KEY_MAPS`); read forwards it loads a checkpoint, read backwards it
writes ours out. Loading is strict: apart from the tensors we leave out on purpose (listed in a
debug log), a missing or unexpected key or a shape mismatch is an error that names the keys.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mm1.config import ROPE_TYPES, DecoderConfig, RopeScalingConfig, VisionConfig
from mm1.models.decoder import Decoder, rope_inv_freq
from mm1.models.vision import VisionTransformer, interpolate_pos_embed, resolve_feature_layer

__all__ = [
    "DECODER_TYPES",
    "KEY_MAPS",
    "VISION_TYPES",
    "KeyMap",
    "decoder_config_from_hf",
    "decoder_config_to_hf",
    "decoder_from_hf",
    "load_hf_state_dict",
    "read_hf_config",
    "save_decoder_hf",
    "save_vision_hf",
    "vision_config_from_hf",
    "vision_config_to_hf",
    "vision_encoder_from_hf",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

CONFIG_NAME = "config.json"
# The weight files transformers writes, in the order it prefers them.
WEIGHTS_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _checkpoint_dir(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory not found: {p}")
    return p


def read_hf_config(path_or_dict: PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as a dict: from a dict, a directory, or a config.json path."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    p = Path(path_or_dict)
    f = p / CONFIG_NAME if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {p}")
    return json.loads(f.read_text())


def load_hf_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: one safetensors file, a sharded set with its
    index, or the same for pytorch_model.bin."""
    d = _checkpoint_dir(path)
    name = next((n for n in WEIGHTS_NAMES if (d / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{d}: no weights file (looked for {', '.join(WEIGHTS_NAMES)})")
    files = [d / name]
    if name.endswith(".index.json"):
        weight_map: dict[str, str] = json.loads(files[0].read_text())["weight_map"]
        files = [d / shard for shard in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{d / name} lists shards that are missing: {absent}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_weights(f))
    return state


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        return load_file(f)
    # weights_only=True: never unpickle arbitrary objects (or run the code they would carry).
    obj = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{f} does not hold a flat state dict of tensors")
    return obj


def _write_checkpoint(
    out_dir: PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # transformers refuses safetensors files whose metadata lacks format=pt.
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _need(d: Mapping[str, Any], key: str, what: str) -> Any:
    if d.get(key) is None:
        raise ValueError(f"{what} has no {key!r}")
    return d[key]


# ---------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMap:
    """Checkpoint key <-> our key for one family: a module prefix (optional when reading, since
    e.g. transformers 4 writes CLIPVisionModel under `vision_model.` and transformers 5 does not),
    then (checkpoint fragment, our fragment) renames; keys in `outside_prefix` have no prefix."""

    prefix: str
    renames: tuple[tuple[str, str], ...] = ()
    outside_prefix: tuple[str, ...] = ()

    def to_ours(self, key: str) -> str:
        key = key.removeprefix(self.prefix)
        for theirs, ours in self.renames:
            key = key.replace(theirs, ours)
        return key

    def to_hf(self, key: str) -> str:
        for theirs, ours in reversed(self.renames):
            key = key.replace(ours, theirs)
        return key if key in self.outside_prefix else self.prefix + key


_VIT_RENAMES = (
    ("embeddings.patch_embedding.", "patch_embed."),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("encoder.layers.", "blocks."),
    (".mlp.fc1.", ".mlp.0."),
    (".mlp.fc2.", ".mlp.2."),
)

KEY_MAPS: dict[str, KeyMap] = {
    "clip": KeyMap(
        "vision_model.",
        (
            *_VIT_RENAMES,
            ("embeddings.class_embedding", "cls_token"),
            ("pre_layrnorm.", "pre_norm."),  # sic: transformers' spelling
        ),
    ),
    "siglip": KeyMap("vision_model.", _VIT_RENAMES),
    # Our decoder's parameter names are Llama's (Qwen2 and Mistral use the same ones).
    "decoder": KeyMap("model.", outside_prefix=("lm_head.weight",)),
}


def _load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    keymap: KeyMap,
    ignore: Callable[[str], bool],
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    dtype: torch.dtype | None,
    source: str,
) -> None:
    """Strictly load `state` (checkpoint keys) into `model` (built on the meta device)."""
    ours: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}  # our key -> checkpoint key, for error messages
    ignored: list[str] = []
    for key, value in state.items():
        k = keymap.to_ours(key)
        if ignore(k):
            ignored.append(key)
            continue
        if k in ours:
            raise ValueError(
                f"{source}: checkpoint keys {names[k]!r} and {key!r} both map to {k!r}"
            )
        ours[k], names[k] = value, key
    if ignored:
        log.debug("%s: left out on purpose: %s", source, ", ".join(sorted(ignored)))

    # A tied parameter appears under several names; it is expected once, under its first name.
    expected: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            expected[k] = t
    missing = sorted(keymap.to_hf(k) for k in expected.keys() - ours.keys())
    unexpected = sorted(names[k] for k in ours.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model; missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'}"
        )
    mismatched = []
    for k, v in ours.items():
        # Always a copy: safetensors' load_file maps the file into memory, and a model whose
        # weights alias the checkpoint changes (or crashes) when that file is rewritten.
        cast = dtype if dtype is not None and v.is_floating_point() else v.dtype
        v = v.to(cast, copy=True)
        if k in transforms:
            try:
                v = transforms[k](v)
            except ValueError as err:
                raise ValueError(f"{source}: {names[k]}: {err}") from None
        if v.shape != expected[k].shape:
            mismatched.append(
                f"{names[k]}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            )
        ours[k] = v
    if mismatched:
        raise ValueError(f"{source}: shape mismatch: {'; '.join(mismatched)}")
    # strict=False only so tied aliases may be absent; every other key was checked above.
    model.load_state_dict(ours, strict=False, assign=True)


# ---------------------------------------------------------------------------------------------
# Vision encoders: CLIP, SigLIP
# ---------------------------------------------------------------------------------------------

VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# Two-tower checkpoints (CLIPModel, SiglipModel): the image tower's config is `vision_config`.
_TWO_TOWER_TYPES = {"clip": "clip", "siglip": "siglip"}
# transformers' class defaults, for configs that leave a key out.
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "siglip": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}
# gelu_new is transformers' own tanh approximation: the same function as gelu_pytorch_tanh.
_ACT_FROM_HF = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _vision_section(hf: Mapping[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(variant, the image tower's config, whether the checkpoint is a two-tower model)."""
    mt = hf.get("model_type")
    if mt in VISION_TYPES:
        return VISION_TYPES[mt], dict(hf), False
    if mt in _TWO_TOWER_TYPES:
        return _TWO_TOWER_TYPES[mt], dict(hf.get("vision_config") or {}), True
    supported = ", ".join([*VISION_TYPES, *_TWO_TOWER_TYPES])
    raise ValueError(f"unsupported vision model_type {mt!r}; supported: {supported}")


def vision_config_from_hf(
    path_or_dict: PathLike | Mapping[str, Any],
    feature_layer: int = -1,
    image_size: int | None = None,
) -> VisionConfig:
    """Our VisionConfig for a CLIP / SigLIP checkpoint (vision-only or two-tower config).

    `image_size` (default: the checkpoint's) sets the input size; the position embeddings are
    interpolated to it when the weights are loaded.
    """
    variant, section, _ = _vision_section(read_hf_config(path_or_dict))
    hf = {**_VISION_DEFAULTS[variant], **section}
    act = hf["hidden_act"]
    if act not in _ACT_FROM_HF:
        raise ValueError(f"vision hidden_act {act!r} is not supported ({', '.join(_ACT_FROM_HF)})")
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"num_channels={hf['num_channels']}: only RGB encoders are supported")
    cfg = VisionConfig(
        variant=variant,
        image_size=int(image_size or hf["image_size"]),
        patch_size=int(hf["patch_size"]),
        width=int(hf["hidden_size"]),
        layers=int(hf["num_hidden_layers"]),
        heads=int(hf["num_attention_heads"]),
        mlp_dim=int(hf["intermediate_size"]),
        act=_ACT_FROM_HF[act],
        norm_eps=float(hf["layer_norm_eps"]),
        feature_layer=feature_layer,
    )
    resolve_feature_layer(feature_layer, cfg.layers)  # fail early on an out-of-range layer
    if cfg.grid < 1:
        raise ValueError(f"image_size={cfg.image_size} is smaller than one patch")
    return cfg


def vision_encoder_from_hf(
    path: PathLike,
    feature_layer: int = -1,
    image_size: int | None = None,
    *,
    dtype: torch.dtype | None = torch.float32,
) -> VisionTransformer:
    """A VisionTransformer with a CLIP / SigLIP checkpoint's weights.

    Called on pixels (B, 3, H, W) it returns the patch features of hidden state `feature_layer`
    (transformers' `hidden_states[feature_layer]`, CLS row dropped for CLIP), before any final
    norm. Only the blocks up to that layer are built; the checkpoint's later blocks, its
    post_layernorm and SigLIP's pooling head are left out on purpose (they act after every hidden
    state we return). With `image_size` other than the checkpoint's, the position embeddings are
    resized like transformers' `interpolate_pos_encoding=True`. `dtype` casts floating weights
    (None keeps the checkpoint's).
    """
    d = _checkpoint_dir(path)
    hf = read_hf_config(d)
    variant, _, two_tower = _vision_section(hf)
    cfg = vision_config_from_hf(hf, feature_layer, image_size)
    state = load_hf_state_dict(d)
    keymap = KEY_MAPS[variant]
    if two_tower:
        # The text tower and the projections are not part of the image encoder.
        others = sorted(k for k in state if not k.startswith(keymap.prefix))
        if others:
            log.debug("%s: not the image tower, left out: %s", d, ", ".join(others))
        state = {k: v for k, v in state.items() if k.startswith(keymap.prefix)}
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    depth = len(model.blocks)

    def ignore(k: str) -> bool:
        if k.startswith(("post_layernorm.", "head.")) or k == "embeddings.position_ids":
            return True  # final norm, SigLIP's pooling head, a buffer old checkpoints saved
        return k.startswith("blocks.") and int(k.split(".")[1]) >= depth

    def pos_embed(t: torch.Tensor) -> torch.Tensor:  # (N[+1], D) -> (1, N'[+1], D)
        return interpolate_pos_embed(t[None], cfg.grid, cfg.cls_token)

    _load_into(model, state, keymap, ignore, {"pos_embed": pos_embed}, dtype, str(d))
    return model


def vision_config_to_hf(cfg: VisionConfig, layers: int) -> dict[str, Any]:
    """A CLIPVisionConfig / SiglipVisionConfig dict for our encoder holding `layers` blocks."""
    if cfg.act not in _ACT_TO_HF:
        raise ValueError(f"activation {cfg.act!r} has no transformers vision counterpart")
    hf: dict[str, Any] = {
        "architectures": ["CLIPVisionModel" if cfg.variant == "clip" else "SiglipVisionModel"],
        "model_type": f"{cfg.variant}_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": layers,
        "num_attention_heads": cfg.heads,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": _ACT_TO_HF[cfg.act],
        "layer_norm_eps": cfg.norm_eps,
    }
    if cfg.variant == "siglip":
        hf["vision_use_head"] = False  # we have no pooling head; without this flag it is required
    return hf


def save_vision_hf(encoder: VisionTransformer, out_dir: PathLike) -> Path:
    """Write `encoder` as a CLIPVisionModel / SiglipVisionModel directory (config.json +
    model.safetensors, keys under `vision_model.`, the Hub layout both transformers 4 and 5 read).

    Our encoder holds only the blocks up to its feature layer, so the written config's
    `num_hidden_layers` is that number of blocks: transformers' `hidden_states[-1]` (CLS row
    dropped for CLIP) then equals our output. Its `post_layernorm` gets weight 1 and bias 0: a
    plain LayerNorm without affine, so `last_hidden_state` / `pooler_output` are normalised
    features, not those of the original checkpoint. SigLIP is written with
    `vision_use_head=false`, so no pooling head is needed.
    """
    cfg = encoder.cfg
    hf = vision_config_to_hf(cfg, len(encoder.blocks))
    hf["dtype"] = str(encoder.pos_embed.dtype).removeprefix("torch.")
    state = dict(encoder.state_dict())
    state["pos_embed"] = state["pos_embed"][0]
    ref = encoder.pos_embed
    state["post_layernorm.weight"] = torch.ones(cfg.width, dtype=ref.dtype)
    state["post_layernorm.bias"] = torch.zeros(cfg.width, dtype=ref.dtype)
    keymap = KEY_MAPS[cfg.variant]
    return _write_checkpoint(out_dir, hf, {keymap.to_hf(k): v for k, v in state.items()})


# ---------------------------------------------------------------------------------------------
# Decoders: Llama, Qwen2, Mistral
# ---------------------------------------------------------------------------------------------

DECODER_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# transformers' class defaults for max_position_embeddings.
_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 131072}


def _rope_from_hf(hf: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScalingConfig]:
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
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    scaling = RopeScalingConfig(type=kind)
    if kind != "default":
        scaling.factor = float(_need(rp, "factor", f"rope scaling {kind!r}"))
    if kind == "llama3":
        scaling.low_freq_factor = float(_need(rp, "low_freq_factor", "rope scaling 'llama3'"))
        scaling.high_freq_factor = float(_need(rp, "high_freq_factor", "rope scaling 'llama3'"))
        scaling.original_max_position_embeddings = int(
            rp.get("original_max_position_embeddings") or max_pos
        )
    return theta, scaling


def _sliding_window_from_hf(hf: Mapping[str, Any], model_type: str, layers: int) -> int:
    if model_type == "mistral":
        return int(hf.get("sliding_window", 4096) or 0)  # null = full attention
    if model_type != "qwen2" or not hf.get("use_sliding_window", False):
        return 0  # Qwen2 ignores its sliding_window unless use_sliding_window is set
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
            f"this Qwen2 config slides the attention window on {sliding} of {len(types)} layers "
            "(max_window_layers / layer_types); mm1's decoder uses one window for every layer"
        )
    return int(window or 0)


def decoder_config_from_hf(path_or_dict: PathLike | Mapping[str, Any]) -> DecoderConfig:
    """Our DecoderConfig for a Llama / Qwen2 / Mistral config (transformers 4 or 5 layout).

    `init` is left unset: the config describes the architecture only.
    """
    hf = read_hf_config(path_or_dict)
    mt = hf.get("model_type")
    if mt not in DECODER_TYPES:
        raise ValueError(
            f"unsupported decoder model_type {mt!r}; supported: {', '.join(DECODER_TYPES)}"
        )
    what = f"{mt} config"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: mm1's decoder has a SwiGLU (silu) FFN only")
    if mt == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        # Llama's attention_bias also puts a bias on o_proj, which our decoder does not have.
        raise ValueError("Llama attention_bias / mlp_bias are not supported by mm1's decoder")
    heads = int(_need(hf, "num_attention_heads", what))
    layers = int(_need(hf, "num_hidden_layers", what))
    max_pos = int(hf.get("max_position_embeddings") or _MAX_POSITIONS[mt])
    theta, scaling = _rope_from_hf(hf, max_pos)
    return DecoderConfig(
        vocab_size=int(_need(hf, "vocab_size", what)),
        dim=int(_need(hf, "hidden_size", what)),
        layers=layers,
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or 0),
        ffn_dim=int(_need(hf, "intermediate_size", what)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_pos,
        qkv_bias=mt == "qwen2",  # Qwen2 always has q/k/v biases (and no o_proj bias)
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window_from_hf(hf, mt, layers),
    )


def decoder_from_hf(path: PathLike, *, dtype: torch.dtype | None = torch.float32) -> Decoder:
    """A Decoder with a Llama / Qwen2 / Mistral checkpoint's weights; its logits on input ids
    (B, T) equal transformers' AutoModelForCausalLM. A tied checkpoint may omit lm_head.weight.
    `dtype` casts floating weights (None keeps the checkpoint's)."""
    d = _checkpoint_dir(path)
    cfg = decoder_config_from_hf(d)
    state = load_hf_state_dict(d)
    with torch.device("meta"):
        model = Decoder(cfg)

    def ignore(k: str) -> bool:
        # Old conversions saved the rotary buffer (we recompute it); a tied head is the embedding.
        return k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight")

    _load_into(model, state, KEY_MAPS["decoder"], ignore, {}, dtype, str(d))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the embedding
    model.inv_freq = rope_inv_freq(cfg)  # non-persistent buffer, still on the meta device
    return model


def decoder_config_to_hf(cfg: DecoderConfig, model_type: str = "llama") -> dict[str, Any]:
    """A transformers config dict of `model_type` for our DecoderConfig; errors name what the
    family cannot express."""
    if model_type not in DECODER_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(DECODER_TYPES)}")
    if cfg.qk_norm:
        raise ValueError(f"{model_type} has no q/k norm (decoder.qk_norm)")
    if cfg.ffn != "swiglu":
        raise ValueError(f"{model_type} has a SwiGLU FFN, not {cfg.ffn!r}")
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
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        hf["sliding_window"] = window
    else:
        kind = "sliding_attention" if window else "full_attention"
        hf.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window else cfg.layers,
            layer_types=[kind] * cfg.layers,
        )
    return hf


def save_decoder_hf(decoder: Decoder, out_dir: PathLike, model_type: str = "llama") -> Path:
    """Write a (plain, unsharded) Decoder as a transformers `model_type` checkpoint
    (config.json + model.safetensors) that AutoModelForCausalLM loads with equal logits.

    A tied head is not written (transformers re-ties it). Written as qwen2, a decoder without
    q/k/v biases gets zero biases, since Qwen2 always has them.
    """
    cfg = decoder.cfg
    hf = decoder_config_to_hf(cfg, model_type)
    hf["dtype"] = str(decoder.embed_tokens.weight.dtype).removeprefix("torch.")
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
    return _write_checkpoint(out_dir, hf, {keymap.to_hf(k): v for k, v in state.items()})
