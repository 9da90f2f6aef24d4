"""Building an encoder pre-training model (CLIP or AIM, `encoder.objective`) and the block
lists `parallelize` shards / checkpoints for it."""

from __future__ import annotations

import importlib

from torch import nn

from mm1.config.encoder import EncoderRunConfig
from mm1.models.aim import AIMModel
from mm1.models.clip import CLIPModel
from mm1.models.family import ModelFamily

EncoderModel = CLIPModel | AIMModel


def build_encoder_model(cfg: EncoderRunConfig, vocab_size: int) -> EncoderModel:
    e = cfg.encoder
    if e.objective == "clip":
        return CLIPModel(cfg.model, e.text, e.clip, vocab_size)
    return AIMModel(cfg.model, e.aim)


def _blocks(model: nn.Module) -> list[nn.ModuleList]:
    text = getattr(model, "text", None)
    return [model.vision.blocks, *([text.blocks] if text is not None else [])]


# Not registered as a `model.family` (an encoder run is no MLLM): handed to `parallelize`.
ENCODER_FAMILY = ModelFamily(
    "encoder",
    build_encoder_model,
    lambda: importlib.import_module("mm1.models.hf"),
    _blocks,
    lambda model: None,
)
