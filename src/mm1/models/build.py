"""Materialising an MM1 model from its config: random init, or starting weights (`train.init`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch

from mm1.config import ConfigError, InitConfig, ModelConfig, validate_model
from mm1.models.family import family_spec
from mm1.models.mllm import MLLM
from mm1.models.starting_point import (
    expected_shapes,
    fuyu_source,
    hf_source,
    llava_source,
    sources,
    starting_state,
    with_deprecated,
)

log = logging.getLogger(__name__)


def resolve_config(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    init: InitConfig | None = None,
) -> ModelConfig:
    """The architecture actually built: an HF starting point's shapes replace the config's, the
    vocabulary is the tokenizer's (`vocab_size`) and the image placeholder its `<image>` id.
    Starting points are `init` (the deprecated `cfg.vision.init` / `cfg.decoder.init` count
    too); the resolved config names none (they are not part of the architecture)."""
    init = with_deprecated(cfg, init)
    cfg = copy.deepcopy(cfg)
    cfg.vision.init = cfg.decoder.init = None
    configured_ffn, configured_type = cfg.decoder.ffn, cfg.decoder.ffn_type
    _refuse_missing_encoder(cfg, init)
    sources(init)  # a starting point of the wrong kind is refused before anything is built
    llava = llava_source(init)
    if llava:
        from mm1.models.hf.llava import llava_model_config_from_hf

        theirs = llava_model_config_from_hf(llava, image_size=cfg.vision.image_size)
        theirs.decoder.attention = cfg.decoder.attention  # how attention is computed stays ours
        theirs.image_layout.encoder_chunk = cfg.image_layout.encoder_chunk
        cfg.vision, cfg.connector, cfg.decoder = theirs.vision, theirs.connector, theirs.decoder
        cfg.image_layout = theirs.image_layout
    fuyu = fuyu_source(init)
    if fuyu:
        from mm1.models.hf.fuyu import fuyu_model_config_from_hf

        attention = cfg.decoder.attention  # how attention is computed stays ours
        cfg = fuyu_model_config_from_hf(fuyu, cfg)
        cfg.decoder.attention = attention
    vision_hf, decoder_hf = hf_source(init, "vision"), hf_source(init, "decoder")
    if vision_hf or decoder_hf:
        hf = family_spec(cfg.family).hf()  # imported here: only needed with HF starting points
        if vision_hf:
            feature_layer, size = cfg.vision.feature_layer, cfg.vision.image_size
            cfg.vision = hf.vision_config_from_hf(vision_hf, feature_layer, size)
        if decoder_hf:
            attention = cfg.decoder.attention
            cfg.decoder = hf.decoder_config_from_hf(decoder_hf)
            # The checkpoint gives the architecture; how attention is computed stays the user's.
            cfg.decoder.attention = attention
    moe_over_dense = configured_type == "moe" and cfg.decoder.ffn_type != "moe"
    if (llava or decoder_hf) and moe_over_dense:
        # A MoE FFN configured over a dense starting decoder: upcycled by the loading chain, as
        # from a run (the checkpoint's dense FFN would otherwise replace it without a word).
        cfg.decoder.ffn = configured_ffn
    if vocab_size is not None:
        cfg.decoder.vocab_size = vocab_size
    if image_token_id is not None:
        cfg.image_token_id = image_token_id
    validate_model(cfg)
    return cfg


def _refuse_missing_encoder(cfg: ModelConfig, init: InitConfig) -> None:
    family = family_spec(cfg.family)
    if family.image_tokenizer and init.vision and hf_source(init, "vision"):
        raise ConfigError(
            f"train.init.vision={init.vision} is a transformers vision model; "
            f"model.family={cfg.family} reads images with its own image tokenizer: a `mm1 "
            f"train-encoder` run with encoder.objective: {family.image_tokenizer}"
        )
    if init.vision and not (family.has_encoder or family.image_tokenizer):
        raise ConfigError(
            f"train.init.vision={init.vision}: model.family={cfg.family} has no image encoder "
            "to start"
        )
    if llava_source(init) and (family.image_tokenizer or not family.has_encoder):
        raise ConfigError(
            f"train.init.weights={init.weights} is a LLaVA checkpoint, whose image encoder "
            f"model.family={cfg.family} does not have (start its decoder with "
            "train.init.decoder)"
        )


def starting_point_state_dict(
    model: MLLM,
    init: InitConfig | None,
    new_token_ids: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The starting weights `init` names, shaped for `model` (any device, the meta device too):
    see `mm1.models.starting_point.starting_state`."""
    init = with_deprecated(model.cfg, init)
    return starting_state(init, model.cfg, expected_shapes(model), new_token_ids, dtype)


def build_model(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    *,
    meta: bool = False,
    new_token_ids: Sequence[int] = (),
    init: InitConfig | None = None,
    load_weights: bool = True,
) -> MLLM:
    """The model of `cfg` (see `resolve_config`) holding the starting weights of `init`.

    With `meta` the model is built on the meta device, without weights: for sharded
    initialisation by `mm1.train.parallel.parallelize`, after which the starting weights are
    loaded with `starting_point_state_dict` (on rank 0, broadcast to the shards).
    `new_token_ids` (the tokenizer's `added_ids`) get fresh embedding rows; `load_weights`
    False builds the architecture only (a resumed run loads its own checkpoint).
    """
    init = with_deprecated(cfg, init)
    cfg = resolve_config(cfg, vocab_size, image_token_id, init)
    family = family_spec(cfg.family)
    if not (meta or load_weights):
        return family.model(cfg)
    with torch.device("meta"):
        shell = family.model(cfg)
    if meta:
        return shell
    if family.image_tokenizer and not (init.vision or init.weights):
        log.warning(
            "model.family=%s with no train.init.vision: its image tokenizer is random and "
            "frozen (train one with `mm1 train-encoder`, encoder.objective: %s)",
            cfg.family,
            family.image_tokenizer,
        )
    state = starting_point_state_dict(shell, init, new_token_ids)
    if state and not _not_in(state, shell):
        # Every weight given: the shell takes the starting tensors themselves, with no random
        # initialisation to overwrite (minutes at 7B) and no second copy of the model in memory.
        assign_weights(shell, _owned(state, shell))
        return shell
    model = family.model(cfg)
    if state:
        # strict=False: parts named nowhere keep their random init (the chain checked the
        # parts it loaded); a tied head is filled through its embedding.
        model.load_state_dict(state, strict=False)
    return model


def _not_in(state: dict[str, torch.Tensor], model: MLLM) -> list[str]:
    """The model's weights (persistent buffers too) that `state` does not give."""
    names = [k for k in model.state_dict() if k not in state]
    if model.cfg.decoder.tie_embeddings and "decoder.embed_tokens.weight" in state:
        names = [k for k in names if k != "decoder.lm_head.weight"]
    return names


def _owned(state: dict[str, torch.Tensor], model: MLLM) -> dict[str, torch.Tensor]:
    """The model's weights in `state`, in the model's dtypes, each holding its own memory: the
    chain may give views (of a fused projection, an expert expanded from a dense FFN) or one
    tensor under two names, which, once they are the parameters, the optimizer would update as
    one."""
    want = {k: t.dtype for k, t in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        if name not in want:
            continue  # not this model's (copying into a random model ignored it too)
        dtype = want[name]
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        ptr = t.untyped_storage().data_ptr()
        if t.dtype != dtype:
            t = t.to(dtype, memory_format=torch.contiguous_format)
        elif not whole or ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[name] = t
    return out


def assign_weights(model: MLLM, state: dict[str, torch.Tensor]) -> None:
    """Give a model built on the meta device `state`'s tensors as its weights (assigned, not
    copied; strict): a tied head shares the embedding, and the computed buffers, which no state
    holds, are made where the weights are."""
    tied = model.cfg.decoder.tie_embeddings
    if tied:
        state = {**state, "decoder.lm_head.weight": state["decoder.embed_tokens.weight"]}
    model.load_state_dict(state, assign=True, strict=True)
    if tied:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    family_spec(model.cfg.family).init_buffers(model)
