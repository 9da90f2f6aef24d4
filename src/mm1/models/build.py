"""Materialising an MM1 model from its config: random init or HF starting points."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from mm1.config import ModelConfig, validate_model
from mm1.models.family import family_spec
from mm1.models.mllm import MM1


def resolve_config(
    cfg: ModelConfig, vocab_size: int | None = None, image_token_id: int | None = None
) -> ModelConfig:
    """The architecture actually built: a starting point's shapes replace the config's, the
    vocabulary is the tokenizer's (`vocab_size`) and the image placeholder its `<image>` id."""
    cfg = copy.deepcopy(cfg)
    hf = family_spec(cfg.family).hf()  # imported here: only needed with HF starting points
    if cfg.vision.init:
        init = cfg.vision.init
        cfg.vision = hf.vision_config_from_hf(init, cfg.vision.feature_layer, cfg.vision.image_size)
        cfg.vision.init = init
    if cfg.decoder.init:
        init, attention = cfg.decoder.init, cfg.decoder.attention
        cfg.decoder = hf.decoder_config_from_hf(init)
        # The checkpoint gives the architecture; how attention is computed stays the user's.
        cfg.decoder.init, cfg.decoder.attention = init, attention
    if vocab_size is not None:
        cfg.decoder.vocab_size = vocab_size
    if image_token_id is not None:
        cfg.image_token_id = image_token_id
    validate_model(cfg)
    return cfg


def starting_point_state_dict(
    cfg: ModelConfig, new_token_ids: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """`vision.*` / `decoder.*` weights of the HF starting points named by a resolved config; a
    pre-trained vocabulary is resized to `cfg.decoder.vocab_size`, and rows past its size and
    of `new_token_ids` (the tokenizer's `added_ids`) start at the mean of the trained rows
    (tied heads stay tied)."""
    hf = family_spec(cfg.family).hf()
    state: dict[str, torch.Tensor] = {}
    if cfg.vision.init:
        encoder = hf.vision_encoder_from_hf(
            cfg.vision.init, cfg.vision.feature_layer, cfg.vision.image_size
        )
        state.update({f"vision.{k}": v for k, v in encoder.state_dict().items()})
    if cfg.decoder.init:
        decoder = hf.decoder_from_hf(cfg.decoder.init)
        decoder.resize_token_embeddings(cfg.decoder.vocab_size, new_token_ids)
        state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    return state


def build_model(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    *,
    meta: bool = False,
    new_token_ids: Sequence[int] = (),
) -> MM1:
    """The model of `cfg` (see `resolve_config`) with the encoder / decoder weights of
    `vision.init` / `decoder.init` (HF checkpoint directories) when set.

    With `meta` the model is built on the meta device, without weights: for sharded
    initialisation by `mm1.train.parallel.parallelize`, after which the starting points are
    loaded with `starting_point_state_dict` (on rank 0, broadcast to the shards).
    `new_token_ids` (the tokenizer's `added_ids`) get fresh embedding rows (see there).
    """
    cfg = resolve_config(cfg, vocab_size, image_token_id)
    family = family_spec(cfg.family)
    if meta:
        with torch.device("meta"):
            return family.model(cfg)
    model = family.model(cfg)
    state = starting_point_state_dict(cfg, new_token_ids)
    if state:
        missing, unexpected = model.load_state_dict(state, strict=False)
        loaded = {k.split(".")[0] for k in state}
        wrong = unexpected + [k for k in missing if k.split(".")[0] in loaded]
        if wrong:
            raise ValueError(f"starting points do not fit the model: {', '.join(wrong[:8])}")
    return model
