"""The small benchmark model in mm1 and the same network as transformers' LLaVA.

mm1: CLIP ViT (64 px, patch 8, width 128 x 3 layers, last layer, CLS dropped) -> 2-layer MLP
connector (LLaVA-1.5's projector, one token per patch: 64 image tokens) -> Llama decoder 256 x 4.
LLaVA: `LlavaForConditionalGeneration` with the same CLIPVisionConfig, `vision_feature_layer=-1`
and `vision_feature_select_strategy="default"` (CLS dropped, so 8 x 8 = 64 image tokens per
image, what `LlavaProcessor` writes with `num_additional_image_tokens=1`), projector GELU with
biases, the same LlamaConfig. `llava_from_mm1` copies the weights through mm1's own converters
(`save_vision_hf`, `save_decoder_hf`), so both models compute the same function.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from mm1.config import DecoderConfig, ModelConfig, VisionConfig, validate_model
from mm1.models.connectors import MLPConnectorConfig


def small_config(
    vocab_size: int,
    image_token_id: int,
    image_size: int = 64,
    max_seq_len: int = 8192,
) -> ModelConfig:
    cfg = ModelConfig(
        vision=VisionConfig(
            variant="clip",
            image_size=image_size,
            patch_size=8,
            width=128,
            layers=3,
            heads=4,
            mlp_dim=512,
            act="gelu",
            feature_layer=-1,
        ),
        connector=MLPConnectorConfig(num_tokens=0, mlp_depth=2),
        decoder=DecoderConfig(
            vocab_size=vocab_size,
            dim=256,
            layers=4,
            heads=4,
            kv_heads=4,
            ffn_dim=688,
            max_seq_len=max_seq_len,
            tie_embeddings=False,
            # auto (the default), sdpa (dense document mask) or varlen (length groups)
            attention=os.environ.get("MM1_BENCH_ATTENTION", "auto"),
        ),
        image_token_id=image_token_id,
    )
    validate_model(cfg)
    return cfg


def build_mm1(cfg: ModelConfig, seed: int = 0):
    from mm1.models.mllm import MM1

    torch.manual_seed(seed)
    return MM1(cfg)


def llava_config(cfg: ModelConfig):
    """The LlavaConfig of the same network as `cfg` (mlp connector of depth 2)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from mm1.models.hf import decoder_config_to_hf, vision_config_to_hf
    from mm1.models.vision import resolve_feature_layer

    if cfg.connector.type != "mlp" or cfg.connector.mlp_depth != 2:
        raise ValueError("LLaVA's projector is the 2-layer MLP connector")
    # Our encoder holds the blocks up to its feature layer; LLaVA runs all its blocks and takes
    # hidden_states[-1] of exactly that many.
    blocks = resolve_feature_layer(cfg.vision.feature_layer, cfg.vision.layers)
    text = decoder_config_to_hf(cfg.decoder)
    text["vocab_size"] = cfg.decoder.vocab_size
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_config_to_hf(cfg.vision, blocks)).to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        image_token_index=cfg.resolved_image_token_id,
        image_seq_length=cfg.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.decoder.tie_embeddings,
    )


def build_llava(cfg: ModelConfig, seed: int = 0):
    """LlavaForConditionalGeneration (SDPA attention, fp32) of the same shapes, random init."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(
        llava_config(cfg), attn_implementation="sdpa", dtype=torch.float32
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def llava_from_mm1(model):
    """A LlavaForConditionalGeneration holding `model`'s weights, converted with mm1's own
    exporters (`save_vision_hf`, `save_decoder_hf`) and transformers' loaders."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from mm1.models.hf import save_decoder_hf, save_vision_hf

    llava = build_llava(model.cfg)
    with tempfile.TemporaryDirectory() as tmp:
        vdir = save_vision_hf(model.vision, Path(tmp) / "vision")
        ddir = save_decoder_hf(model.decoder, Path(tmp) / "decoder")
        vision = CLIPVisionModel.from_pretrained(vdir)
        lm = LlamaForCausalLM.from_pretrained(ddir)
        llava.model.vision_tower.load_state_dict(vision.state_dict())
        llava.model.language_model.load_state_dict(lm.model.state_dict())
        llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    proj = model.connector.proj
    p = llava.model.multi_modal_projector
    with torch.no_grad():
        for ours, theirs in ((proj[0], p.linear_1), (proj[2], p.linear_2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return llava


def cast_as_loaded(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`net` in `dtype` as a load in `dtype` gives it: mm1's `load_pretrained(dtype=...)` and
    transformers' `from_pretrained(dtype=...)`. Saved floating tensors (parameters, persistent
    buffers) are cast; computed buffers (the rotary frequencies, in no state dict) stay fp32, as
    both libraries compute them, and so does what mm1 keeps fp32 (`weight_dtype`: a frozen image
    tokenizer). `net.to(dtype)` would round the rotary frequencies too: a model neither library
    runs."""
    from mm1.config import ModelConfig
    from mm1.models.family import weight_dtype

    cfg = getattr(net, "cfg", None)
    for prefix, module in net.named_modules():
        for name, t in list(module.named_parameters(recurse=False)) + [
            (n, b)
            for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set
        ]:
            key = f"{prefix}.{name}" if prefix else name
            want = weight_dtype(cfg, key, dtype) if isinstance(cfg, ModelConfig) else dtype
            if t.is_floating_point() and t.dtype != want:
                t.data = t.data.to(want)
    return net


def compile_blocks(model: torch.nn.Module) -> None:
    """`torch.compile` every transformer block of the encoder and the decoder in place, the way
    mm1's trainer does with `train.compile=true` (and torchtitan per block); for transformers'
    LLaVA, the CLIP encoder layers and the Llama layers."""
    from mm1.train.parallel import block_lists

    if hasattr(model, "model") and hasattr(model.model, "vision_tower"):  # LLaVA
        lists = [model.model.vision_tower.encoder.layers, model.model.language_model.layers]
    else:
        lists = block_lists(model)
    for blocks in lists:
        for i in range(len(blocks)):
            blocks[i] = torch.compile(blocks[i])


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
