"""Model families: what the rest of mm1 needs to know about a family of models, in one spec.

`model.family` names a registered spec; building, HF conversion, sharding and materialisation
ask the spec instead of assuming MM1's class or guessing its attribute names. MM1 is the one
family today; others (Fuyu-like, Emu2, ...) register their own spec beside their model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from torch import nn

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


def family_spec(name: str) -> ModelFamily:
    """The spec of the family `name` (`model.family`)."""
    entry = FAMILIES.get(name)
    if entry is None:
        raise ValueError(
            f"model.family={name!r} is not a registered family; {FAMILIES.registered()}"
        )
    return entry.value


def family_of(model: nn.Module) -> ModelFamily:
    """The spec of a built model (from its config's `family`)."""
    return family_spec(model.cfg.family)


def _mm1_hf() -> ModuleType:
    return importlib.import_module("mm1.models.hf")


def _mm1_blocks(model: nn.Module) -> list[nn.ModuleList]:
    return [model.vision.blocks, model.decoder.layers]


def _mm1_init_buffers(model: nn.Module) -> None:
    model.init_buffers()


MM1_FAMILY = FAMILIES.register("mm1")(
    ModelFamily("mm1", MM1, _mm1_hf, _mm1_blocks, _mm1_init_buffers)
)
