"""CLIP / SigLIP image encoders: configs and weights from and to HF checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mm1.config import VisionConfig
from mm1.models.hf.checkpoint import (
    KEY_MAPS,
    PathLike,
    checkpoint_dir,
    load_hf_state_dict,
    load_into,
    read_hf_config,
    write_checkpoint,
)
from mm1.models.vision import VisionTransformer, interpolate_pos_embed, resolve_feature_layer

log = logging.getLogger(__name__)
_WARNED_SIZES: set[tuple[int, int]] = set()


VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# Two-tower checkpoints (CLIPModel, SiglipModel): the image tower's config is `vision_config`.
TWO_TOWER_TYPES = {"clip": "clip", "siglip": "siglip"}
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
    if mt in TWO_TOWER_TYPES:
        return TWO_TOWER_TYPES[mt], dict(hf.get("vision_config") or {}), True
    supported = ", ".join([*VISION_TYPES, *TWO_TOWER_TYPES])
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
    native = int(hf["image_size"])
    if image_size and image_size != native and (image_size, native) not in _WARNED_SIZES:
        _WARNED_SIZES.add((image_size, native))  # resolving a config twice says it once
        log.warning(
            "model.vision.image_size=%d differs from the vision checkpoint's %d px: its position "
            "embeddings are interpolated (set model.vision.image_size=%d to keep them)",
            image_size,
            native,
            native,
        )
    cfg = VisionConfig(
        variant=variant,
        image_size=int(image_size or native),
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


def vision_ignored(depth: int) -> Callable[[str], bool]:
    """Which of a checkpoint's keys (our names) an encoder of `depth` blocks leaves out."""

    def ignore(k: str) -> bool:
        if k.startswith(("post_layernorm.", "head.")) or k == "embeddings.position_ids":
            return True  # final norm, SigLIP's pooling head, a buffer old checkpoints saved
        return k.startswith("blocks.") and int(k.split(".")[1]) >= depth

    return ignore


def vision_hf_state(path: PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """(variant, the image tower's tensors under checkpoint names): a two-tower checkpoint's
    text tower and projections are left out."""
    d = checkpoint_dir(path)
    variant, _, two_tower = _vision_section(read_hf_config(d))
    state = load_hf_state_dict(d)
    if two_tower:
        prefix = KEY_MAPS[variant].prefix
        others = sorted(k for k in state if not k.startswith(prefix))
        if others:
            log.debug("%s: not the image tower, left out: %s", d, ", ".join(others))
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    return variant, state


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
    d = checkpoint_dir(path)
    cfg = vision_config_from_hf(d, feature_layer, image_size)
    variant, state = vision_hf_state(d)
    keymap = KEY_MAPS[variant]
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    ignore = vision_ignored(len(model.blocks))

    def pos_embed(t: torch.Tensor) -> torch.Tensor:  # (N[+1], D) -> (1, N'[+1], D)
        return interpolate_pos_embed(t[None], cfg.grid, cfg.cls_token)

    load_into(model, state, keymap, ignore, {"pos_embed": pos_embed}, dtype, str(d))
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
    hf = vision_config_to_hf(encoder.cfg, len(encoder.blocks))
    hf["dtype"] = str(encoder.pos_embed.dtype).removeprefix("torch.")
    return write_checkpoint(out_dir, hf, vision_state_to_hf(encoder))


def vision_state_to_hf(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """`encoder`'s tensors under CLIPVisionModel / SiglipVisionModel names (`vision_model.`
    prefix), with the identity `post_layernorm` `save_vision_hf` describes."""
    cfg = encoder.cfg
    state = dict(encoder.state_dict())
    state["pos_embed"] = state["pos_embed"][0]
    ref = encoder.pos_embed
    state["post_layernorm.weight"] = torch.ones(cfg.width, dtype=ref.dtype)
    state["post_layernorm.bias"] = torch.zeros(cfg.width, dtype=ref.dtype)
    keymap = KEY_MAPS[cfg.variant]
    return {keymap.to_hf(k): v for k, v in state.items()}
