"""Building an encoder pre-training model (CLIP, AIM, VQ or SEED, `encoder.objective`), a SEED
tokenizer's start from its CLIP run, and the block lists `parallelize` shards / checkpoints."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import NoReturn

from torch import nn

from mm1.config import ConfigError, to_dict
from mm1.config.encoder import EncoderRunConfig
from mm1.models.aim import AIMModel
from mm1.models.clip import CLIPModel
from mm1.models.family import ModelFamily
from mm1.models.seed_tokenizer import SEEDModel
from mm1.models.vq import VQModel

EncoderModel = CLIPModel | AIMModel | VQModel | SEEDModel


def build_encoder_model(
    cfg: EncoderRunConfig, vocab_size: int, load_weights: bool = True
) -> EncoderModel:
    """The objective's model, freshly initialised; an HF text tower (`encoder.text.hf`) starts
    from its checkpoint when `load_weights`."""
    e = cfg.encoder
    if e.objective in ("clip", "seed"):
        tower = None
        if e.text.hf is not None:
            from mm1.models.hf_text import HFTextTower

            # SEED's tower is its CLIP run's, whose weights `seed_start_state` reads.
            tower = HFTextTower(e.text, load_weights and e.objective == "clip")
        if e.objective == "seed":
            return SEEDModel(cfg.model, e.text, e.clip, e.vq, vocab_size, tower)
        return CLIPModel(cfg.model, e.text, e.clip, vocab_size, tower)
    if e.objective == "vq":
        return VQModel(cfg.model.vq, e.vq)
    return AIMModel(cfg.model, e.aim)


def seed_start_state(cfg: EncoderRunConfig) -> dict[str, object]:
    """The frozen parts of a SEED tokenizer run, from the CLIP run `train.init.vision` names
    (its newest checkpoint, or a checkpoint of it): its ViT, image projection, text tower and
    text projection, under the SEED model's names. Refused, naming the key, unless the CLIP
    run has this run's `model.vision`, `encoder.text` and an embedding as wide as
    `model.seed.embed_dim`."""
    from mm1.checkpoint import encoder_objective

    path = cfg.train.init.vision
    key = f"train.init.vision={path}"
    objective = encoder_objective(path) if path else None
    if objective != "clip":
        what = f"an encoder run of encoder.objective={objective}" if objective else "no encoder run"
        raise ConfigError(
            f"{key} is {what}: encoder.objective=seed starts from a CLIP run (its ViT and text "
            "tower, frozen)"
        )
    clip_cfg, clip = load_encoder_run(path)
    pairs = [
        ("model.vision", to_dict(clip_cfg.model.vision), to_dict(cfg.model.vision)),
        ("encoder.text", to_dict(clip_cfg.encoder.text), to_dict(cfg.encoder.text)),
    ]
    for section, theirs, ours in pairs:
        for k in sorted(theirs):
            if theirs[k] != ours.get(k):
                raise ConfigError(
                    f"{section}.{k}={ours.get(k)!r}, and the CLIP run {key} has "
                    f"{theirs[k]!r}: the SEED tokenizer reads with that run's towers"
                )
    embed = clip_cfg.encoder.clip.embed_dim
    if embed != cfg.model.seed.embed_dim:
        raise ConfigError(
            f"model.seed.embed_dim={cfg.model.seed.embed_dim}, and the CLIP run {key} embeds "
            f"in {embed} dimensions (encoder.clip.embed_dim): the generation embedding's target "
            "and the contrastive space are that run's"
        )
    parts = {
        "vision.vit.": clip.vision,
        "vision.image_proj.": clip.image_proj,
        "text.": clip.text,
        "text_proj.": clip.text_proj,
    }
    return {p + k: v for p, module in parts.items() for k, v in module.state_dict().items()}


def _blocks(model: nn.Module) -> list[nn.ModuleList]:
    if isinstance(model, VQModel):  # a small convolutional net: one unit, the root
        return []
    if isinstance(model, SEEDModel):  # the trained Q-Former's blocks; the frozen towers: root
        return [model.vision.qformer]
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
