"""Training FLOPs of runs that freeze parts (`ModelSummary.flops_per_token(k, trained)`),
against torch's FLOP counter on a real forward and backward: what freezing the ViT, or
training the decoder through LoRA adapters, saves is exactly the gradients autograd skips."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mm1.config import LoRAConfig, TrainConfig, model_config_from_dict
from mm1.models.lora import add_decoder_lora
from mm1.models.mllm import MM1
from mm1.models.summary import Trained, summarize
from mm1.train.optim import set_trainable, trained_parts
from tests.train.run_configs import TINY_VISION

IMAGE_ID, SEQ, IMAGES = 49, 32, 2


def _model() -> MM1:
    # a connector (32 -> 128 -> 128 per patch) as costly as the tiny ViT, so both savings show
    decoder = {"vocab_size": 50, "dim": 128, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_dim": 256}
    cfg = {
        "vision": TINY_VISION,
        "connector": {"type": "mlp", "num_tokens": 0},
        "decoder": decoder,
        "image_token_id": IMAGE_ID,
    }
    torch.manual_seed(0)
    return MM1(model_config_from_dict(cfg))


def _step_flops(train: TrainConfig) -> tuple[int, MM1]:
    """FLOPs torch counts in one forward and backward of a sequence with IMAGES images."""
    model = _model()
    if train.lora.rank:
        add_decoder_lora(model, train.lora)
    set_trainable(model, train)
    q = model.num_image_tokens
    text = torch.randint(
        0, IMAGE_ID, (SEQ - IMAGES * q,), generator=torch.Generator().manual_seed(0)
    )
    ids = torch.cat([torch.full((IMAGES * q,), IMAGE_ID), text])[None]
    size = model.cfg.vision.image_size
    pixels = torch.randn(IMAGES, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids, pixel_values=pixels).loss.backward()
    return counter.get_total_flops(), model


@pytest.mark.parametrize(
    ("frozen", "low"),
    [
        ({"lora": LoRAConfig(rank=4)}, 0.97),
        ({"train_vision": False}, 0.8),
        ({"train_vision": False, "train_connector": False}, 0.8),
        ({"lora": LoRAConfig(rank=4), "train_vision": False}, 0.8),
    ],
    ids=["lora", "vit", "vit+connector", "lora+vit"],
)
def test_frozen_parts_save_the_flops_autograd_skips(frozen: dict, low: float) -> None:
    """The saving counted against the one measured (0.997 of it for LoRA, 0.86-0.98 with the
    ViT frozen), smaller by what the 6 N convention counts and autograd skips: the norms'
    weight gradients, and the input gradient of a trained encoder's first layer (the tiny
    ViT's patch embedding is a large share of it)."""
    everything, model = _step_flops(TrainConfig())
    partial, partial_model = _step_flops(TrainConfig(**frozen))
    s = summarize(model.cfg, SEQ)
    trained = trained_parts(partial_model, TrainConfig(**frozen))
    # rank 4 x (in + out) of q, k, v, o (128 -> 128, 64, 64, 128), the MLP's (128 <-> 256), 2 blocks
    assert trained.adapters == (
        2 * 4 * (256 + 192 + 192 + 256 + 3 * 384) if "lora" in frozen else 0
    )
    assert s.flops_per_token(IMAGES, Trained()) == s.flops_per_token(IMAGES)  # as before
    saved = (s.flops_per_token(IMAGES) - s.flops_per_token(IMAGES, trained)) * SEQ
    assert low < (everything - partial) / saved <= 1.0
