"""Hugging Face checkpoints in and out: CLIP / SigLIP image encoders, Llama / Qwen2 / Mistral
decoders, Mixtral / Qwen3-MoE MoE decoders (other MoE layouts out and back as our custom code,
`custom_moe`).

transformers is an optional dependency, so nothing here imports it: `config.json` is read with
json and the weights with safetensors, or with `torch.load(weights_only=True)` for
`pytorch_model.bin` (that unpickler only rebuilds tensors and containers; it never runs code).
Each family has one key table (`KEY_MAPS`); read forwards it loads a checkpoint, read backwards it
writes ours out. Files and key tables are in `checkpoint`; the families in `vision` and
`decoder`; whole models in `llava` (LLaVA / LLaVA-NeXT) and `custom` (transformers custom code,
the model file in `remote/`), imported on use. Loading is strict: apart from the tensors we
leave out on purpose (listed in a debug log), a missing or unexpected key or a shape mismatch
is an error that names the keys.
"""

from __future__ import annotations

from mm1.models.hf.checkpoint import (
    KEY_MAPS,
    KeyMap,
    load_hf_state_dict,
    read_hf_config,
)
from mm1.models.hf.decoder import (
    DECODER_TYPES,
    decoder_config_from_hf,
    decoder_config_to_hf,
    decoder_from_hf,
    decoder_hf_state,
    decoder_ignored,
    decoder_to_hf,
    save_decoder_hf,
)
from mm1.models.hf.vision import (
    VISION_TYPES,
    save_vision_hf,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_encoder_from_hf,
    vision_hf_state,
    vision_ignored,
    vision_state_to_hf,
)

__all__ = [
    "DECODER_TYPES",
    "KEY_MAPS",
    "VISION_TYPES",
    "KeyMap",
    "decoder_config_from_hf",
    "decoder_config_to_hf",
    "decoder_from_hf",
    "decoder_hf_state",
    "decoder_ignored",
    "decoder_to_hf",
    "load_hf_state_dict",
    "read_hf_config",
    "save_decoder_hf",
    "save_vision_hf",
    "vision_config_from_hf",
    "vision_config_to_hf",
    "vision_encoder_from_hf",
    "vision_hf_state",
    "vision_ignored",
    "vision_state_to_hf",
]
