"""The encoder on crops in chunks (`model.image_layout.encoder_chunk`): the same features as
one call, and under FSDP on 2 gloo processes a training step where the ranks hold different
numbers of crops (so of encoder calls) finishes with the reference's loss and gradients."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from mm1.config import (
    ConnectorConfig,
    DecoderConfig,
    ImageLayoutConfig,
    ModelConfig,
    TrainConfig,
    VisionConfig,
)
from tests.gloo import WORLD, gloo_rank, spawn_ranks

IMAGE_SIZE = 16


def _config(chunk: int) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            image_size=IMAGE_SIZE, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=4),
        decoder=DecoderConfig(vocab_size=64, dim=32, layers=1, heads=4, kv_heads=2, ffn_dim=64),
        image_layout=ImageLayoutConfig(type="mm1", encoder_chunk=chunk),
    )


def _batch(model, images: int) -> dict[str, torch.Tensor | None]:
    """`images` mm1-layout images (5 crops, 20 slots each) in a row of 64 tokens."""
    gen = torch.Generator().manual_seed(images)
    ids = torch.randint(0, 60, (1, 64), generator=gen)
    for i in range(images):
        ids[0, 2 + 22 * i : 22 + 22 * i] = model.image_token_id
    pixels = torch.randn(5 * images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) if images else None
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def test_chunks_give_the_features_of_one_call() -> None:
    from mm1.models.build import build_model

    torch.manual_seed(0)
    whole = build_model(_config(0)).eval()
    chunked = build_model(_config(3)).eval()
    chunked.load_state_dict(whole.state_dict())
    pixels = torch.randn(7, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(chunked.image_features(pixels), whole.image_features(pixels))
    calls = []
    chunked.vision.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        chunked.image_features(pixels)
    assert len(calls) == 3  # 3 + 3 + 1 crops


def _worker(rank: int, root: str) -> None:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    with gloo_rank(rank, root):
        from mm1.models.build import build_model
        from mm1.train.parallel import Dist, parallelize

        torch.manual_seed(0)  # the same weights on both ranks
        model = build_model(_config(chunk=2))
        reference = copy.deepcopy(model).train()
        sharded = parallelize(model, TrainConfig(parallel="fsdp"), Dist(rank, WORLD, rank))
        sharded.train()
        # rank 0: 2 images = 10 crops = 5 encoder calls; rank 1: text only (1 blank call)
        batches = [_batch(reference, 2), _batch(reference, 0)]
        loss = sharded(**batches[rank]).loss
        loss.backward()
        for b in batches:  # the reference: both ranks' batches, gradients averaged
            (reference(**b).loss / WORLD).backward()
        grads = {}
        for name, p in sharded.named_parameters():
            full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = (full, dict(reference.named_parameters())[name].grad)
        torch.save(
            {"got": loss.item(), "want": reference(**batches[rank]).loss.item(), "grads": grads},
            Path(root) / f"rank{rank}.pt",
        )


def test_fsdp_step_with_different_crop_counts_per_rank(tmp_path: Path) -> None:
    spawn_ranks(_worker, tmp_path, what="FSDP step with chunked crops", timeout=150)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["got"] == pytest.approx(out["want"], rel=1e-5)
        for name, (got, want) in out["grads"].items():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
