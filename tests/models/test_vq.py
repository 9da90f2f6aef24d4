"""The VQ image tokenizer: nearest-code lookup, the straight-through gradient, the training loss
written out, and the codebook's EMA step with its dead-code restarts written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm1.config import VQConfig
from mm1.config.encoder import VQObjectiveConfig
from mm1.models.vq import VQModel, VQTokenizer

CFG = VQConfig(channels=[8, 16], codebook_size=12, code_dim=4)  # 4x down: 16 px -> 4 x 4


def _tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(CFG)


def test_codes_are_the_nearest_by_cosine_and_decode_to_the_image_shape() -> None:
    vq = _tokenizer()
    pixels = torch.randn(3, 3, 16, 16)
    codes = vq.encode(pixels)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    z = vq.latents(pixels).detach().reshape(3, 16, -1)
    for n in range(3):
        for cell in range(16):  # brute force: the largest cosine over every code
            cos = [float(F.cosine_similarity(z[n, cell], c, dim=0)) for c in vq.codes]
            assert int(codes[n, cell]) == max(range(len(cos)), key=cos.__getitem__)
    assert vq.decode(codes).shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="do not make a square grid"):
        vq.decode(codes[:, :15])


def test_the_codebook_is_no_parameter_and_the_gradient_passes_straight_through() -> None:
    model = VQModel(CFG, VQObjectiveConfig())
    names = {n for n, _ in model.named_parameters()}
    assert not any("codes" in n or "code_" in n for n in names)  # buffers: the optimiser's not
    assert {"vision.codes", "vision.code_sum", "vision.code_count"} <= set(model.state_dict())
    model.eval()  # no EMA step: the loss below sees the same codebook
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = model(pixels)
    out.loss.backward()
    first = model.vision.encoder[0].weight.grad
    assert first is not None and first.abs().sum() > 0  # reconstruction reaches the encoder
    # the loss written out: reconstruction mse + beta x commitment
    vq = model.vision
    with torch.no_grad():
        z = vq.latents(pixels)
        e = vq.code_vectors(vq.codes_of(z))
        recon = vq.decoder(e.permute(0, 3, 1, 2))
        expected = (recon - pixels).square().mean() + 0.25 * (z - e).square().sum(-1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < out.metrics["codes_used"] <= 1 and out.metrics["codes_restarted"] == 0


def test_the_ema_step_and_the_dead_code_restart_written_out() -> None:
    vq = _tokenizer()
    vq.code_count.copy_(torch.linspace(0.05, 2.0, 12))  # codes 0 and 1 below 0.1 after decay
    vq.code_sum.copy_(torch.randn(12, 4))
    old_sum, old_count = vq.code_sum.clone(), vq.code_count.clone()
    z = F.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    codes = torch.tensor([2, 2, 3, 5, 5, 5, 7, 7, 11, 11])
    restarted = vq.update_codebook(z, codes, 0.9, 0.1, torch.Generator().manual_seed(3))
    count = torch.bincount(codes, minlength=12).float()
    total = torch.zeros(12, 4).index_add_(0, codes, z)
    want_count = 0.9 * old_count + 0.1 * count
    want_sum = 0.9 * old_sum + 0.1 * total
    dead = want_count < 0.1
    assert restarted == int(dead.sum()) >= 1
    pick = torch.randint(10, (int(dead.sum()),), generator=torch.Generator().manual_seed(3))
    want_sum[dead] = z[pick]
    want_count[dead] = 1.0
    torch.testing.assert_close(vq.code_count, want_count)
    torch.testing.assert_close(vq.code_sum, want_sum)
    torch.testing.assert_close(vq.codes, F.normalize(want_sum, dim=-1))


def test_a_fresh_codebook_starts_from_the_first_batch() -> None:
    """Counts start at 0: the first training step restarts every code no output chose, so the
    codebook begins where the encoder's outputs are (and the training forward runs the step)."""
    model = VQModel(CFG, VQObjectiveConfig())
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    before = model.vision.codes.clone()
    out = model.train()(pixels, generator=torch.Generator().manual_seed(5))
    assert out.metrics["codes_restarted"] >= CFG.codebook_size - 4 * 16
    assert not torch.equal(before, model.vision.codes)
    z = model.vision.latents(pixels).reshape(-1, CFG.code_dim).detach()
    restarted = model.vision.code_count == 1.0
    for row in model.vision.codes[restarted]:  # each restarted code is one of the outputs
        assert (z @ row).max() == pytest.approx(1.0, abs=1e-5)


def test_codes_do_not_depend_on_autocast() -> None:
    """The codes a model trained under bf16 autocast reads are the ones it is evaluated with in
    fp32: the tokenizer runs at its weights' precision whatever autocast is on."""
    vq = _tokenizer()
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", torch.bfloat16):
        under = vq.encode(pixels)
    assert torch.equal(under, vq.encode(pixels))


def test_a_nonfinite_batch_leaves_the_codebook_alone() -> None:
    vq = _tokenizer()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.full((4, 4), float("nan"))
    assert vq.update_codebook(z, torch.zeros(4, dtype=torch.long), 0.9, 0.1, None) == 0
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_a_cast_keeps_the_codebook_in_fp32_and_the_codes_unchanged() -> None:
    """lmms-eval casts a whole model to bf16: the codebook's buffers keep their fp32 values, so
    the codes of an image are the same as before (the convolutions run in bf16 alone)."""
    vq = _tokenizer()
    book = vq.codes.clone()
    vq.to(torch.bfloat16)
    assert vq.encoder[0].weight.dtype == torch.bfloat16
    assert all(getattr(vq, n).dtype == torch.float32 for n in ("codes", "code_sum", "code_count"))
    assert torch.equal(vq.codes, book)
    assert vq.encode(torch.randn(2, 3, 16, 16)).shape == (2, 16)
