"""LLaVA / LLaVA-NeXT checkpoints (transformers' `LlavaForConditionalGeneration` /
`LlavaNextForConditionalGeneration`): our model with the `mlp` connector written as one, and
such a directory (ours, or llava-hf's Hub layout) read back as a model config and weights.

The encoder is written cut at its feature layer (`vision_feature_layer: -1`), CLS dropped by
`vision_feature_select_strategy: default` (CLIP) or kept by `full` (SigLIP, which has none);
the projector's two Linear layers are `multi_modal_projector.linear_1 / linear_2`; LLaVA-NeXT's
canvases are `image_grid_pinpoints` as (height, width) px. Keys are written the way transformers
5 saves these classes (`vision_tower.`, `language_model.model.`, `language_model.lm_head.`);
read, the Hub's `vision_tower.vision_model.` and transformers 5's in-memory names
(`model.language_model.`, `lm_head.`) are accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mm1.config import ImageLayoutConfig, ModelConfig
from mm1.models.hf.checkpoint import (
    KEY_MAPS,
    MAX_SHARD_BYTES,
    PathLike,
    read_hf_config,
    to_our_keys,
    write_checkpoint,
)
from mm1.models.hf.decoder import decoder_config_from_hf, decoder_ignored, decoder_to_hf
from mm1.models.hf.moe import fuse_experts
from mm1.models.hf.persimmon import persimmon_state_from_hf
from mm1.models.hf.vision import (
    VISION_TYPES,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_ignored,
    vision_state_to_hf,
)
from mm1.models.mllm import MM1
from mm1.models.vision import resolve_feature_layer
from mm1.tiling import canvas_candidates

LLAVA_TYPES = {"single": "llava", "anyres": "llava_next"}
LLAVA_ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}
# transformers' LlavaConfig / LlavaNextConfig defaults, for configs that leave a key out.
_LLAVA_DEFAULTS: dict[str, Any] = {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
}
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# LlamaConfig's defaults: llava-hf's configs leave the Llama text config's sizes out.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
# The projector: LLaVA's linear_{i} is our mlp connector's proj.{2(i - 1)} (GELU between).
_PROJECTOR = {
    "multi_modal_projector.linear_1.": "proj.0.",
    "multi_modal_projector.linear_2.": "proj.2.",
}


def llava_model_type(cfg: ModelConfig) -> str:
    """ "llava" (layout single) or "llava_next" (anyres) when the model is one transformers runs
    as such; else a ValueError saying what does not fit."""
    conn = cfg.connector
    kind = conn["type"] if isinstance(conn, Mapping) else conn.type
    if kind != "mlp":
        raise ValueError(
            f"LLaVA's projector is the 2-layer mlp connector; the connector is {kind!r}"
        )
    depth = int(conn.get("mlp_depth", 2) if isinstance(conn, Mapping) else conn.mlp_depth)
    if depth != 2:
        raise ValueError(f"LLaVA's projector has 2 Linear layers; connector.mlp_depth={depth}")
    layout = cfg.image_layout.type
    if layout not in LLAVA_TYPES:
        raise ValueError(
            f"image_layout.type={layout!r} has no LLaVA counterpart (single: LLaVA, anyres: "
            "LLaVA-NeXT)"
        )
    if cfg.family != "mm1":
        raise ValueError(f"model.family={cfg.family!r} is not an mm1 (LLaVA-shaped) model")
    return LLAVA_TYPES[layout]


def _kept_layers(cfg: ModelConfig) -> int:
    return resolve_feature_layer(cfg.vision.feature_layer, cfg.vision.layers)


def llava_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of a model of (resolved) `cfg` as LLaVA / LLaVA-NeXT, but for
    `text_config`, which `save_llava_hf` adds from the decoder; LLaVA-NeXT's canvases as
    `image_grid_pinpoints` in (height, width) px."""
    model_type = llava_model_type(cfg)
    v = cfg.vision
    hf: dict[str, Any] = {
        "architectures": [LLAVA_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vision_config": vision_config_to_hf(v, _kept_layers(cfg)),
        "vision_feature_layer": -1,  # the encoder is written cut at its feature layer
        "vision_feature_select_strategy": "default" if v.cls_token else "full",
        "image_token_index": cfg.resolved_image_token_id,
        "image_seq_length": v.num_patches,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
    }
    if model_type == "llava_next":
        lay = cfg.image_layout
        canvases = canvas_candidates(v.image_size, lay.pinpoints, lay.grid)
        hf["image_grid_pinpoints"] = [[h, w] for w, h in canvases]
    return hf


def save_llava_hf(
    model: MM1,
    out_dir: PathLike,
    decoder_type: str | None = None,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write `model` (mlp connector, layout single / anyres) as a transformers LLaVA /
    LLaVA-NeXT directory: config.json and the weights (sharded with an index above
    `max_shard_bytes`). `decoder_type`: the text model's family (None: `default_decoder_type`,
    the family that expresses the decoder)."""
    hf = llava_config_to_hf(model.cfg)
    text, decoder_tensors = decoder_to_hf(model.decoder, decoder_type)
    hf["text_config"] = text
    hf["dtype"] = str(model.decoder.embed_tokens.weight.dtype).removeprefix("torch.")
    tensors = {f"language_model.{k}": v for k, v in decoder_tensors.items()}
    vision_prefix = KEY_MAPS[model.cfg.vision.variant].prefix
    for k, v in vision_state_to_hf(model.vision).items():
        tensors["vision_tower." + k.removeprefix(vision_prefix)] = v
    ours_to_theirs = {o: t for t, o in _PROJECTOR.items()}
    for k, v in model.connector.state_dict().items():
        head = k[: k.index(".", len("proj.")) + 1]
        tensors[ours_to_theirs[head] + k[len(head) :]] = v
    if model.image_newline is not None:
        tensors["image_newline"] = model.image_newline
    return write_checkpoint(out_dir, hf, tensors, max_shard_bytes)


def is_llava_config(path: PathLike) -> bool:
    """Whether the directory's config.json is a LLaVA / LLaVA-NeXT model's."""
    return read_hf_config(path).get("model_type") in LLAVA_ARCHITECTURES


def _llava_section(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The config with transformers' defaults filled in, checked for what we can build."""
    mt = hf.get("model_type")
    if mt not in LLAVA_ARCHITECTURES:
        raise ValueError(f"model_type {mt!r} is not a LLaVA one ({', '.join(LLAVA_ARCHITECTURES)})")
    out = {**_LLAVA_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if "image_token_id" in hf and hf["image_token_id"] is not None:
        out["image_token_index"] = hf["image_token_id"]  # transformers 5's name for it
    act = out["projector_hidden_act"]
    if act != "gelu":
        raise ValueError(f"projector_hidden_act={act!r}: the mlp connector's activation is gelu")
    if not out["multimodal_projector_bias"]:
        raise ValueError("multimodal_projector_bias=false: the mlp connector has biases")
    if not isinstance(out["vision_feature_layer"], int):
        raise ValueError(
            f"vision_feature_layer={out['vision_feature_layer']}: features concatenated from "
            "several layers are not supported"
        )
    return out


def llava_model_config_from_hf(
    path_or_dict: PathLike | Mapping[str, Any], image_size: int | None = None
) -> ModelConfig:
    """Our ModelConfig (vision, mlp connector, decoder, layout, image token) for a LLaVA /
    LLaVA-NeXT checkpoint. `image_size` (default: the checkpoint's) sets the crop size; the
    LLaVA-NeXT canvases are scaled with it, so they keep their size in crops."""
    hf = _llava_section(read_hf_config(path_or_dict))
    vision_hf = dict(hf.get("vision_config") or {"model_type": "clip_vision_model"})
    vision_hf.setdefault("model_type", "clip_vision_model")
    if vision_hf["model_type"] not in VISION_TYPES:
        raise ValueError(
            f"vision_config.model_type={vision_hf['model_type']!r} is not supported "
            f"({', '.join(VISION_TYPES)})"
        )
    vision = vision_config_from_hf(vision_hf, hf["vision_feature_layer"], image_size)
    strategy = hf["vision_feature_select_strategy"]
    want = "default" if vision.cls_token else "full"
    if strategy != want:
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} with a {vision.variant} encoder: mm1 "
            f"{'drops' if vision.cls_token else 'has no'} CLS row (strategy {want!r})"
        )
    text_hf = dict(hf.get("text_config") or {"model_type": "llama"})
    text_hf.setdefault("model_type", "llama")
    if text_hf["model_type"] == "llama":
        text_hf = {**_LLAMA_DEFAULTS, **text_hf}
    decoder = decoder_config_from_hf(text_hf)
    layout = ImageLayoutConfig(type="single")
    if hf["model_type"] == "llava_next":
        native = int(vision_hf.get("image_size") or vision.image_size)
        pinpoints = hf.get("image_grid_pinpoints") or _NEXT_PINPOINTS
        scale = vision.image_size
        layout = ImageLayoutConfig(
            type="anyres",
            pinpoints=[[int(w) * scale // native, int(h) * scale // native] for h, w in pinpoints],
        )
    return ModelConfig(
        vision=vision,
        connector={"type": "mlp", "num_tokens": 0, "mlp_depth": 2},
        decoder=decoder,
        image_token_id=int(hf["image_token_index"]),
        image_layout=layout,
    )


def _normalised_key(key: str) -> tuple[str, str]:
    """(part, key within the part) of a LLaVA checkpoint key, whichever layout wrote it."""
    key = key.removeprefix("model.")  # transformers 5's in-memory names
    if key.startswith("language_model.model."):
        return "decoder", "model." + key.removeprefix("language_model.model.")
    if key.startswith("language_model.lm_head."):
        return "decoder", key.removeprefix("language_model.")
    if key.startswith("language_model."):
        return "decoder", "model." + key.removeprefix("language_model.")
    if key.startswith("lm_head."):
        return "decoder", key
    if key.startswith("vision_tower."):
        return "vision", key.removeprefix("vision_tower.")
    if key.startswith("multi_modal_projector."):
        return "connector", key
    return "other", key


def llava_state_to_ours(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """A LLaVA checkpoint's tensors under our names (`vision.`, `connector.`, `decoder.`,
    `image_newline`) for a model of (resolved) `cfg`: the encoder's blocks past its feature
    layer and its final norm, a tied head and old rotary buffers left out."""
    groups: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "decoder": {}}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        part, k = _normalised_key(key)
        if part in groups:
            groups[part][k] = value
        elif part == "connector":
            head = next((h for h in _PROJECTOR if k.startswith(h)), None)
            if head is None:
                raise ValueError(f"LLaVA checkpoint key {key!r}: not a 2-layer projector's")
            out["connector." + _PROJECTOR[head] + k[len(head) :]] = value
        elif k == "image_newline":
            out[k] = value
        else:
            raise ValueError(f"LLaVA checkpoint key {key!r} has no place in an mm1 model")
    variant = cfg.vision.variant
    vision, _ = to_our_keys(
        groups["vision"], KEY_MAPS[variant], vision_ignored(_kept_layers(cfg)), "vision_tower"
    )
    decoder_state = groups["decoder"]
    if any(".experts." in k for k in decoder_state):
        decoder_state = fuse_experts(decoder_state, "language_model")
    if any(".self_attn.query_key_value." in k for k in decoder_state):  # a Persimmon text model
        decoder_state = persimmon_state_from_hf(decoder_state, cfg.decoder.heads)
    decoder, _ = to_our_keys(
        decoder_state, KEY_MAPS["decoder"], decoder_ignored(cfg.decoder), "language_model"
    )
    out.update({f"vision.{k}": v for k, v in vision.items()})
    out.update({f"decoder.{k}": v for k, v in decoder.items()})
    return out


__all__ = [
    "LLAVA_ARCHITECTURES",
    "LLAVA_TYPES",
    "is_llava_config",
    "llava_config_to_hf",
    "llava_model_config_from_hf",
    "llava_model_type",
    "llava_state_to_ours",
    "save_llava_hf",
]
