"""Model families: what the rest of mm1 needs to know about a family of models, in one spec.

`model.family` names a registered spec; building, HF conversion, sharding, materialisation
and the config's checks ask the spec instead of assuming MM1's class or guessing its attribute
names. Each family registers its spec beside its model: `mm1` here, `fuyu` in
`mm1.models.fuyu`, `emu2` in `mm1.models.emu2`, `chameleon` in `mm1.models.chameleon`, `seed`
in `mm1.models.seed`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from mm1.config import ConfigError, ModelConfig
from mm1.models.mllm import MM1
from mm1.registry import FAMILIES


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model: Callable[..., nn.Module]  # built as model(cfg: ModelConfig)
    # HF adapters: the module with the family's config and weight converters, imported on use
    # (transformers and safetensors only when a starting point is read).
    hf: Callable[[], ModuleType]
    # The transformer-block lists, in wrapping order: each block is one FSDP unit (before the
    # root), and the unit of activation checkpointing and per-block compile.
    blocks: Callable[[nn.Module], list[nn.ModuleList]]
    # Computes the non-persistent buffers (which no checkpoint holds) after `to_empty` or a
    # meta-device load by assignment.
    init_buffers: Callable[[nn.Module], None]
    # Image tokens per crop from the (component-resolved) config, before any model is built:
    # the data side writes that many slots per image.
    num_image_tokens: Callable[[ModelConfig], int]
    # The family's own checks of a component-resolved `model` section (prefix, e.g. "model"),
    # raising ConfigError naming the key.
    validate: Callable[[ModelConfig, str], None]
    # How an image becomes tokens, in a few words (`mm1 info`).
    describe: Callable[[ModelConfig], str]
    # Whether the family has an image encoder (`model.vision`'s transformer): starting points
    # and exports of the encoder need one.
    has_encoder: bool = True
    # The auxiliary loss the family computes on its image slots (`MLLM.image_losses`), if any:
    # emu2's `image_regression` (its form set by `model.regression_loss`), chameleon's
    # `image_codes`.
    image_loss: str = ""
    # The `encoder.objective` of the image tokenizer `vision` is, trained apart by `mm1
    # train-encoder` (chameleon's `vq`, seed's `seed`), or "": `train.init.vision` starts it
    # from such a run, and an MLLM run keeps it frozen whatever `train.train_vision` says (its
    # codes are the targets).
    image_tokenizer: str = ""
    # The codes such a tokenizer adds to the decoder's vocabulary, from the config.
    codebook_size: Callable[[ModelConfig], int] | None = None
    # A family whose image encoder and connector this one's are, key for key (emu2: mm1's):
    # starting points carry those parts over between the two.
    image_parts_of: str = ""


def family_spec(name: str) -> ModelFamily:
    """The spec of the family `name` (`model.family`)."""
    entry = FAMILIES.get(name)
    if entry is None:
        raise ValueError(
            f"model.family={name!r} is not a registered family; {FAMILIES.registered()}"
        )
    return entry.value


def shares_image_parts(a: str, b: str) -> bool:
    """Whether models of families `a` and `b` hold the same image encoder and connector."""
    return a == b or family_spec(a).image_parts_of == b or family_spec(b).image_parts_of == a


def weight_dtype(cfg: ModelConfig, key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the floating weight `key` of a `cfg` model is read in for a model that runs in
    `dtype`: fp32 for a frozen image tokenizer's (chameleon's, seed's `vision.*`, codebook
    included), as training keeps it, since bf16 would flip its codes near a tie; else `dtype`."""
    if family_spec(cfg.family).image_tokenizer and key.startswith("vision."):
        return torch.float32
    return dtype


def family_of(model: nn.Module) -> ModelFamily:
    """The spec of a built model (from its config's `family`)."""
    return family_spec(model.cfg.family)


def mm1_hf() -> ModuleType:
    """mm1's HF adapters (decoders, encoders, LLaVA)."""
    return importlib.import_module("mm1.models.hf")


def decoder_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """The blocks of a family whose image side is not trained by gradient as blocks (fuyu's
    Linear, chameleon's and seed's frozen tokenizers): the decoder's."""
    return [model.decoder.layers]


def _mm1_blocks(model: nn.Module) -> list[nn.ModuleList]:
    return [model.vision.blocks, model.decoder.layers]


def _mm1_init_buffers(model: nn.Module) -> None:
    model.init_buffers()


def _mm1_num_image_tokens(cfg: ModelConfig) -> int:
    return cfg.connector.num_tokens or cfg.vision.num_patches


def _mm1_validate(cfg: ModelConfig, prefix: str) -> None:
    cfg.connector.validate(f"{prefix}.connector", cfg)
    if cfg.image_layout.type == "fuyu":
        raise ConfigError(
            f"{prefix}.image_layout.type=fuyu: Fuyu's canvas gives each patch its own token, "
            "which needs model.family=fuyu (an encoder's connector makes a fixed number)"
        )


def _mm1_describe(cfg: ModelConfig) -> str:
    v = cfg.vision
    return f"{v.variant} ViT ({v.layers} blocks) -> {cfg.connector.type}"


MM1_FAMILY = FAMILIES.register("mm1")(
    ModelFamily(
        "mm1",
        MM1,
        mm1_hf,
        _mm1_blocks,
        _mm1_init_buffers,
        num_image_tokens=_mm1_num_image_tokens,
        validate=_mm1_validate,
        describe=_mm1_describe,
    )
)
