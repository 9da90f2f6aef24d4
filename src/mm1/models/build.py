"""Materialising an MM1 model from its config: random init or HF starting points."""

from __future__ import annotations

import copy

import torch

from mm1.config import ModelConfig, validate_model
from mm1.models.mllm import MM1


def build_model(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    *,
    meta: bool = False,
) -> MM1:
    """The model of `cfg`, with the encoder / decoder weights of `vision.init` / `decoder.init`
    (HF checkpoint directories) when set, and the vocabulary sized for the tokenizer
    (`vocab_size`; new rows of a pre-trained embedding start at the mean of the old ones).

    The returned model's `cfg` describes the architecture actually built (a checkpoint's shapes
    replace the config's), so it can be saved and rebuilt. With `meta` and no HF starting point
    the model is built on the meta device (no memory) for sharded initialisation by
    `mm1.train.parallel.parallelize`; starting points are loaded in full (on every rank).
    """
    from mm1.models import hf  # deferred: only needed with HF starting points

    cfg = copy.deepcopy(cfg)
    if cfg.vision.init:
        init = cfg.vision.init
        cfg.vision = hf.vision_config_from_hf(init, cfg.vision.feature_layer, cfg.vision.image_size)
        cfg.vision.init = init
    if cfg.decoder.init:
        init = cfg.decoder.init
        cfg.decoder = hf.decoder_config_from_hf(init)
        cfg.decoder.init = init
    elif vocab_size is not None:
        cfg.decoder.vocab_size = vocab_size
    if image_token_id is not None:
        cfg.image_token_id = image_token_id
    if vocab_size is not None and cfg.image_token_id >= vocab_size:
        raise ValueError(
            f"image_token_id={cfg.image_token_id} is outside the tokenizer's {vocab_size} ids"
        )
    if not cfg.decoder.init:
        validate_model(cfg)
    if meta and not (cfg.vision.init or cfg.decoder.init):
        with torch.device("meta"):
            return MM1(cfg)
    model = MM1(cfg)
    if cfg.vision.init:
        encoder = hf.vision_encoder_from_hf(
            cfg.vision.init, cfg.vision.feature_layer, cfg.vision.image_size
        )
        model.vision.load_state_dict(encoder.state_dict())
    if cfg.decoder.init:
        decoder = hf.decoder_from_hf(cfg.decoder.init)
        decoder.cfg.init = cfg.decoder.init
        model.decoder = decoder
        model.cfg.decoder = decoder.cfg
        if vocab_size is not None:
            decoder.resize_token_embeddings(vocab_size)
    return model
