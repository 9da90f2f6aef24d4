"""CLIP's InfoNCE: against a direct per-pair computation, symmetric, and its gathered form over
2 gloo ranks against one process on the joined batch (loss, feature gradients, and parameter
gradients after DDP's averaging with the trainer's world-size factor); the same for a SEED
tokenizer, whose loss adds per-rank means (`global_mean`) to the gathered contrastive term."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mm1.config import ModelConfig, VisionConfig
from mm1.config.encoder import CLIPObjectiveConfig, TextTowerConfig
from mm1.models.clip import CLIPModel
from mm1.models.contrastive import clip_loss, gathered_clip_loss
from tests.gloo import WORLD, gloo_rank, spawn_ranks
from tests.models.seed_tiny import seed_tokenizer_model

LOCAL, DIM = 3, 5


def _direct_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Per pair, in plain Python: -log of the matching pair's softmax share, both ways."""
    n = image.shape[0]

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    total = 0.0
    for i in range(n):
        i2t = [scale * cos(image[i], text[j]) for j in range(n)]
        t2i = [scale * cos(text[i], image[j]) for j in range(n)]
        for row in (i2t, t2i):
            total += -row[i] + math.log(sum(math.exp(v) for v in row))
    return total / (2 * n)


def test_clip_loss_equals_the_direct_per_pair_computation_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, DIM, generator=g), torch.randn(6, DIM, generator=g)
    scale = torch.tensor(7.5)
    got = float(clip_loss(image, text, scale))
    assert got == pytest.approx(_direct_loss(image, text, 7.5), rel=1e-5)
    assert float(clip_loss(text, image, scale)) == pytest.approx(got, rel=1e-6)
    # matched pairs score lower than the same features shuffled
    assert got < float(clip_loss(image, text.roll(1, 0), scale))


def _tiny_clip() -> CLIPModel:
    vision = VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32)
    text = TextTowerConfig(width=16, layers=1, heads=2, mlp_dim=32, max_len=6)
    torch.manual_seed(0)
    return CLIPModel(ModelConfig(vision=vision), text, CLIPObjectiveConfig(embed_dim=8), 40)


def _joined_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL
    return {
        "pixel_values": torch.randn(n, 3, 16, 16, generator=g),
        "input_ids": torch.randint(0, 40, (n, 6), generator=g),
        "lengths": torch.randint(2, 7, (n,), generator=g),
        "feats": torch.randn(2, n, DIM, generator=g),
    }


def _worker(rank: int, root: str) -> None:
    with gloo_rank(rank, root):
        b = _joined_batch()
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        # 1. features: the gathered loss and the gradient of this rank's rows
        image = b["feats"][0, rows].clone().requires_grad_()
        text = b["feats"][1, rows].clone().requires_grad_()
        scale = torch.tensor(3.0, requires_grad=True)
        loss = gathered_clip_loss(image, text, scale)
        loss.backward()
        # 2. the real CLIP model under DDP, backpropagated as the trainer does (loss * world)
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(_tiny_clip())
        out = model(b["pixel_values"][rows], b["input_ids"][rows], b["lengths"][rows])
        (out.loss * WORLD).backward()
        grads = {k: p.grad.clone() for k, p in model.module.named_parameters()}
        # 3. a SEED tokenizer (eval mode: its codebook stays put; gradients flow all the same)
        seed = DistributedDataParallel(seed_tokenizer_model().eval())
        px = b["pixel_values"][rows]
        seed_out = seed(px, b["input_ids"][rows].clamp(max=39), b["lengths"][rows])
        (seed_out.loss * WORLD).backward()
        seed_grads = {
            k: p.grad.clone() for k, p in seed.module.named_parameters() if p.requires_grad
        }
        torch.save(
            {
                "loss": loss.item(),
                "image_grad": image.grad,
                "text_grad": text.grad,
                "scale_grad": scale.grad,
                "model_loss": out.loss.item(),
                "model_grads": grads,
                "seed_loss": seed_out.loss.item(),
                "seed_grads": seed_grads,
            },
            Path(root) / f"rank{rank}.pt",
        )


def test_gathered_loss_over_two_ranks_equals_one_process_on_the_joined_batch(tmp_path) -> None:
    spawn_ranks(_worker, tmp_path, what="contrastive loss")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    b = _joined_batch()
    image = b["feats"][0].clone().requires_grad_()
    text = b["feats"][1].clone().requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    want = clip_loss(image, text, scale)
    want.backward()
    for r, out in enumerate(got):
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        assert out["loss"] == pytest.approx(want.item(), rel=1e-6)  # every rank: the global loss
        torch.testing.assert_close(out["image_grad"], image.grad[rows])
        torch.testing.assert_close(out["text_grad"], text.grad[rows])
    # the scale's gradient is shared out: the ranks' parts sum to the whole
    torch.testing.assert_close(sum(o["scale_grad"] for o in got), scale.grad)

    model = _tiny_clip()
    out = model(b["pixel_values"], b["input_ids"], b["lengths"])
    out.loss.backward()
    for o in got:
        assert o["model_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
        for k, p in model.named_parameters():
            torch.testing.assert_close(o["model_grads"][k], p.grad, rtol=1e-4, atol=1e-6, msg=k)

    seed = seed_tokenizer_model().eval()
    out = seed(b["pixel_values"], b["input_ids"].clamp(max=39), b["lengths"])
    out.loss.backward()
    for o in got:
        assert o["seed_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
        assert sorted(o["seed_grads"]) == sorted(
            k for k, p in seed.named_parameters() if p.requires_grad
        )
        for k, g in o["seed_grads"].items():
            p = dict(seed.named_parameters())[k]
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_logit_scale_is_learned_and_clamped_at_100() -> None:
    model = _tiny_clip()
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    b = _joined_batch()
    opt = torch.optim.SGD([model.logit_scale], lr=0.5)
    before = model.logit_scale.item()
    for _ in range(3):
        opt.zero_grad()
        model(b["pixel_values"], b["input_ids"], b["lengths"]).loss.backward()
        assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
        opt.step()
    assert model.logit_scale.item() != before
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert float(model.scale().detach()) == pytest.approx(100.0, rel=1e-5)
    model.zero_grad()
    model(b["pixel_values"], b["input_ids"], b["lengths"]).loss.backward()
    assert model.logit_scale.grad.abs() == 0  # beyond the clamp: no gradient pushes it further
    clone = copy.deepcopy(model)
    assert float(clone.scale().detach()) == pytest.approx(100.0, rel=1e-5)


def test_a_clip_state_saved_with_a_scalar_logit_scale_still_loads() -> None:
    model = _tiny_clip()
    assert model.logit_scale.shape == (1,)  # FSDP2 refuses 0-d parameters
    old = {k: v.clone() for k, v in model.state_dict().items()}
    old["logit_scale"] = torch.tensor(1.5)  # as runs saved it before
    fresh = _tiny_clip()
    fresh.load_state_dict(old, strict=True)
    assert fresh.logit_scale.tolist() == [1.5]
