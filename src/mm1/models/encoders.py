"""Building an encoder pre-training model (CLIP, AIM or VQ, `encoder.objective`) and the block
lists `parallelize` shards / checkpoints for it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import NoReturn

from torch import nn

from mm1.config.encoder import EncoderRunConfig
from mm1.models.aim import AIMModel
from mm1.models.clip import CLIPModel
from mm1.models.family import ModelFamily
from mm1.models.vq import VQModel

EncoderModel = CLIPModel | AIMModel | VQModel


def build_encoder_model(
    cfg: EncoderRunConfig, vocab_size: int, load_weights: bool = True
) -> EncoderModel:
    """The objective's model, freshly initialised; an HF text tower (`encoder.text.hf`) starts
    from its checkpoint when `load_weights`."""
    e = cfg.encoder
    if e.objective == "clip":
        tower = None
        if e.text.hf is not None:
            from mm1.models.hf_text import HFTextTower

            tower = HFTextTower(e.text, load_weights)
        return CLIPModel(cfg.model, e.text, e.clip, vocab_size, tower)
    if e.objective == "vq":
        return VQModel(cfg.model.vq, e.vq)
    return AIMModel(cfg.model, e.aim)


def _blocks(model: nn.Module) -> list[nn.ModuleList]:
    if isinstance(model, VQModel):  # a small convolutional net: one unit, the root
        return []
    text = getattr(model, "text", None)
    return [model.vision.blocks, *([text.blocks] if text is not None else [])]


def _not_an_mllm(*args: object) -> NoReturn:
    raise TypeError("an encoder run has no image slots: the encoder spec is no model.family")


# Not registered as a `model.family` (an encoder run is no MLLM): handed to `parallelize`.
ENCODER_FAMILY = ModelFamily(
    "encoder",
    build_encoder_model,
    lambda: importlib.import_module("mm1.models.hf"),
    _blocks,
    lambda model: None,
    num_image_tokens=_not_an_mllm,
    validate=_not_an_mllm,
    describe=_not_an_mllm,
)


def load_encoder_run(path: str | Path) -> tuple[EncoderRunConfig, EncoderModel]:
    """An encoder run (its newest checkpoint) or one of its checkpoints, as the model it
    trained (eval mode, CPU, float32), with its saved config."""
    from mm1.checkpoint import is_checkpoint, read_model_weights
    from mm1.config.encoder import load_encoder_config

    p = Path(path)
    run = p.parent.parent if is_checkpoint(p) else p
    saved_cfg = run / "config.yaml"
    if not saved_cfg.is_file():
        raise FileNotFoundError(f"{run} is not an encoder run directory (no config.yaml)")
    cfg = load_encoder_config(saved_cfg)
    state = read_model_weights(p).state
    vocab = state["text.embed_tokens.weight"].shape[0] if "text.embed_tokens.weight" in state else 1
    model = build_encoder_model(cfg, vocab, load_weights=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ValueError(f"{p}: not a {cfg.encoder.objective} encoder run ({first})") from None
    return cfg, model.eval()
