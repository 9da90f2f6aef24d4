"""Models whose connector transformers has no class for (C-Abstractor, attnpool, avgpool,
pixel_shuffle, linear) written as transformers custom code: config.json with `auto_map` pointing at
`modeling_mm1.py` (copied from `models/hf/remote/`, torch and transformers only), loaded with
`AutoModel.from_pretrained(dir, trust_remote_code=True)`.

The weights: the encoder as transformers' CLIP / SigLIP vision model cut at its feature layer
(`vision_tower.`), the connector under our names (`connector.`), the decoder as the
`text_config` causal LM (`language_model.`): a transformers class, or for a MoE decoder that
fits neither Mixtral nor Qwen3-MoE our `mm1_moe` (`modeling_mm1_moe.py`, copied too, which
`modeling_mm1.py` imports). The config's `connector` holds the connector's
options with Q resolved; `image_layout` is a record of how images become crops (the processor
side is mm1's; the remote model takes the crops in slot order).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from mm1.models.hf.checkpoint import KEY_MAPS, MAX_SHARD_BYTES, PathLike, write_checkpoint
from mm1.models.hf.custom_moe import copy_moe_code
from mm1.models.hf.decoder import decoder_to_hf
from mm1.models.hf.vision import vision_config_to_hf, vision_state_to_hf
from mm1.models.mllm import MM1

REMOTE_CODE = Path(__file__).parent / "remote" / "modeling_mm1.py"
# Layouts whose image tokens are each crop's Q tokens in order (what the remote model does).
CUSTOM_LAYOUTS = ("single", "mm1", "dynamic")
AUTO_MAP = {
    "AutoConfig": "modeling_mm1.MM1Config",
    "AutoModel": "modeling_mm1.MM1ForConditionalGeneration",
}


# Why the families beside mm1's (fuyu's goes out as FuyuForCausalLM) have no export.
NO_EXPORT = {
    "emu2": "its regression head, which writes image features, has no transformers class",
    "chameleon": "its VQ image tokenizer is mm1's own, not transformers' Chameleon one",
    "seed": "its SEED tokenizer (Q-Former and codebook) has no transformers class",
}


def custom_config_to_hf(model: MM1, decoder_type: str | None = None) -> dict[str, Any]:
    """config.json of `model` as the remote `MM1Config` (`text_config` from the decoder)."""
    cfg = model.cfg
    layout = cfg.image_layout.type
    if layout not in CUSTOM_LAYOUTS:
        if layout == "anyres":
            raise ValueError(
                "--to-hf: the anyres layout runs in transformers as LLaVA-NeXT, which needs the "
                f"mlp connector (2 layers); this model's connector is {cfg.connector.type!r}"
            )
        raise ValueError(f"--to-hf: image_layout.type={layout!r} has no custom-code export")
    if cfg.family != "mm1":
        why = NO_EXPORT.get(cfg.family, "the export writes mm1's own architecture only")
        raise ValueError(f"--to-hf: model.family={cfg.family!r} has no transformers form ({why})")
    connector = dataclasses.asdict(cfg.connector)
    connector["num_tokens"] = model.num_image_tokens
    text, _ = decoder_to_hf(model.decoder, decoder_type)
    dtype = model.decoder.embed_tokens.weight.dtype
    return {
        "architectures": ["MM1ForConditionalGeneration"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "mm1",
        "vision_config": vision_config_to_hf(cfg.vision, len(model.vision.blocks)),
        "text_config": text,
        "connector": connector,
        "drop_cls": cfg.vision.cls_token,
        "image_token_id": cfg.resolved_image_token_id,
        "image_layout": dataclasses.asdict(cfg.image_layout),
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_custom_hf(
    model: MM1,
    out_dir: PathLike,
    decoder_type: str | None = None,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write `model` as a transformers custom-code directory: config.json, the weights
    (sharded with an index above `max_shard_bytes`), `modeling_mm1.py` and
    `modeling_mm1_moe.py`. `decoder_type`: the text model's family (None: `default_decoder_type`,
    the family that expresses the decoder, else `mm1_moe`). The anyres layout is refused:
    it is LLaVA-NeXT's, exported as such."""
    hf = custom_config_to_hf(model, decoder_type)
    _, decoder_tensors = decoder_to_hf(model.decoder, decoder_type)
    tensors = {f"language_model.{k}": v for k, v in decoder_tensors.items()}
    if model.cfg.decoder.tie_embeddings:
        # Written as its own copy (safetensors refuses shared storage): the remote model then
        # loads an equal head whether or not transformers ties it to the embedding.
        tensors["language_model.lm_head.weight"] = model.decoder.lm_head.weight.detach().clone()
    vision_prefix = KEY_MAPS[model.cfg.vision.variant].prefix
    for k, v in vision_state_to_hf(model.vision).items():
        tensors["vision_tower." + k.removeprefix(vision_prefix)] = v
    tensors.update({f"connector.{k}": v for k, v in model.connector.state_dict().items()})
    out = write_checkpoint(out_dir, hf, tensors, max_shard_bytes)
    shutil.copyfile(REMOTE_CODE, out / REMOTE_CODE.name)
    copy_moe_code(out)  # imported by modeling_mm1.py, whatever the text model
    return out
