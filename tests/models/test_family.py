"""Model families by spec: the mm1 spec names the blocks `parallelize` wraps, and a model built on
the meta device computes its own non-persistent buffers once it has weights."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from mm1.config import (
    ConnectorConfig,
    DecoderConfig,
    ModelConfig,
    RopeScalingConfig,
    TrainConfig,
    VisionConfig,
)
from mm1.models.family import MM1_FAMILY, family_of, family_spec
from mm1.models.mllm import MM1
from mm1.train.parallel import Dist, parallelize


def _config(feature_layer: int = -1) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            image_size=32,
            patch_size=8,
            width=32,
            layers=2,
            heads=2,
            mlp_dim=64,
            feature_layer=feature_layer,
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=4),
        decoder=DecoderConfig(
            vocab_size=64,
            dim=32,
            layers=3,
            heads=4,
            kv_heads=2,
            ffn_dim=64,
            rope_theta=500000.0,
            rope_scaling=RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 64),
        ),
    )


def _guessed_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """What `parallelize` wrapped before the spec: the first of `blocks` / `layers` of the
    `vision` and `decoder` attributes that is a non-empty ModuleList."""
    found = []
    for part in (getattr(model, "vision", None), getattr(model, "decoder", None)):
        blocks = getattr(part, "blocks", None) or getattr(part, "layers", None)
        if isinstance(blocks, nn.ModuleList):
            found.append(blocks)
    return found


def test_the_mm1_spec_names_the_blocks_that_were_wrapped_before() -> None:
    assert family_spec("mm1") is MM1_FAMILY
    for feature_layer, vision_blocks in ((-1, 2), (1, 1), (0, 0)):  # 0: no encoder block
        model = MM1(_config(feature_layer))
        assert family_of(model) is MM1_FAMILY
        spec_units = [b for blocks in MM1_FAMILY.blocks(model) for b in blocks]
        guessed = [b for blocks in _guessed_blocks(model) for b in blocks]
        assert len(spec_units) == len(guessed) == 3 + vision_blocks
        assert all(a is b for a, b in zip(spec_units, guessed, strict=True))


def test_parallelize_wraps_the_blocks_the_spec_names() -> None:
    model = MM1(_config())
    decoder_only = dataclasses.replace(MM1_FAMILY, blocks=lambda m: [m.decoder.layers])
    cfg = TrainConfig(parallel="none", activation_checkpointing=True)
    parallelize(model, cfg, Dist(), decoder_only)
    assert all(isinstance(b, CheckpointWrapper) for b in model.decoder.layers)
    assert not any(isinstance(b, CheckpointWrapper) for b in model.vision.blocks)
    wrapped = MM1(_config())
    parallelize(wrapped, cfg, Dist())  # default: the spec `model.family` names
    assert all(isinstance(b, CheckpointWrapper) for b in wrapped.vision.blocks)


def test_a_meta_built_model_computes_its_own_buffers() -> None:
    torch.manual_seed(0)
    eager = MM1(_config())
    state = eager.state_dict()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

    # materialised in place (FSDP's path): to_empty, then the weights, then the spec's buffers
    with torch.device("meta"):
        late = MM1(_config())
    late.to_empty(device="cpu")
    late.load_state_dict(state)
    MM1_FAMILY.init_buffers(late)
    assert torch.equal(late.decoder.inv_freq, eager.decoder.inv_freq)
    torch.testing.assert_close(late(ids).logits, eager(ids).logits, rtol=0, atol=0)

    # weights assigned to a meta-built model (the export loader's path)
    with torch.device("meta"):
        assigned = MM1(_config())
    assigned.load_state_dict(state, assign=True)
    assert assigned.decoder.inv_freq.is_meta  # no state dict holds it
    MM1_FAMILY.init_buffers(assigned)
    assert torch.equal(assigned.decoder.inv_freq, eager.decoder.inv_freq)
    torch.testing.assert_close(assigned(ids).logits, eager(ids).logits, rtol=0, atol=0)
