"""The emu2 family: MM1 with the avgpool connector, plus a head that regresses each image
slot's pooled feature from the position before it. Checked against MM1 (the understanding path
is MM1's), against the loss written out by hand, and against itself (accumulation, cached
generation == a full forward on what it generated)."""

from __future__ import annotations

import pytest
import torch

from mm1.config import (
    IMAGE_REGRESSION,
    ConfigError,
    DecoderConfig,
    ImageLayoutConfig,
    ModelConfig,
    VisionConfig,
    validate_model,
)
from mm1.models.emu2 import Emu2, generate_image_features
from mm1.models.family import family_spec
from mm1.models.mllm import MM1, predicted_slots
from tests.models.family_batches import two_packed_rows

VOCAB, IMG = 64, 63  # the image slot id: the vocabulary's last
Q = 4  # image tokens: the 4 x 4 patch grid pooled to 2 x 2


def _config(family: str = "emu2", **model: object) -> ModelConfig:
    cfg = ModelConfig(
        family=family,
        vision=VisionConfig(image_size=32, patch_size=8, width=24, layers=2, heads=2, mlp_dim=48),
        connector={"type": "avgpool", "num_tokens": Q},
        decoder=DecoderConfig(
            vocab_size=VOCAB, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64, max_seq_len=64
        ),
        image_layout=ImageLayoutConfig(type="single"),
        **model,  # type: ignore[arg-type]
    )
    validate_model(cfg)
    return cfg


def _model(**model: object) -> Emu2:
    torch.manual_seed(0)
    return family_spec("emu2").model(_config(**model)).eval()


def _batch() -> dict[str, torch.Tensor]:
    return two_packed_rows(IMG, Q, 32)


def _expected(model: Emu2, b: dict[str, torch.Tensor], kind: str = "l1") -> torch.Tensor:
    """The loss written out: for every slot whose previous token is in its document, the
    error of `regress` there against the slot's pooled feature, mean over channels, summed,
    over images x Q."""
    with torch.no_grad():
        pooled = model.connector.pool(model.vision(b["pixel_values"])).reshape(-1, 24)
        hidden = model.decoder(
            inputs_embeds=model.embed(b["input_ids"], b["pixel_values"]),
            document_ids=b["document_ids"],
            return_hidden=True,
        )
    total, k = torch.tensor(0.0), 0
    ids, doc = b["input_ids"], b["document_ids"]
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[r, t] != IMG:
                continue
            if t > 0 and doc[r, t - 1] == doc[r, t]:
                err = model.regress(hidden[r, t - 1]) - pooled[k]
                total += (err.abs() if kind == "l1" else err.square()).mean()
            k += 1
    return total / (4 * Q)


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_the_regression_loss_is_the_next_features_error_written_out(kind: str) -> None:
    model = _model(regression_loss=kind)
    b = _batch()
    with torch.no_grad():
        out = model(**b)
    torch.testing.assert_close(out.aux_losses[IMAGE_REGRESSION], _expected(model, b, kind))
    # the slot opening row 0's second document is not regressed (nothing of its own before it)
    regressed = predicted_slots(b["input_ids"] == IMG, b["document_ids"])
    assert int(regressed.sum()) == 4 * Q - 1


def test_the_understanding_path_is_mm1s() -> None:
    """Same weights, same logits and cross-entropy as MM1 with the avgpool connector: the
    regression head only adds a loss."""
    emu2 = _model()
    torch.manual_seed(0)
    mm1 = MM1(_config("mm1")).eval()
    missing = emu2.load_state_dict(mm1.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["regress.bias", "regress.weight"]
    b = _batch()
    with torch.no_grad():
        ours, theirs = emu2(**b, return_logits=True), mm1(**b, return_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    assert IMAGE_REGRESSION not in theirs.aux_losses


def test_image_features_stay_tokens_and_targets_stay_fp32_under_autocast() -> None:
    """Every other caller of `image_features` (RICES' image embeddings) gets the tokens MM1
    would; the targets are the pooled features in fp32 even under bf16 autocast, chunked or
    not."""
    model = _model()
    px = _batch()["pixel_values"]
    with torch.no_grad():
        assert model.image_features(px).shape == (4, Q, 32)
        for chunk in (0, 3):
            model.cfg.image_layout.encoder_chunk = chunk
            with torch.autocast("cpu", torch.bfloat16):
                tokens, targets = model.image_tokens_and_targets(px)
                pooled = model.connector.pool(model.vision(px))
            assert targets.dtype == torch.float32 and tokens.shape == (4 * Q, 32)
            torch.testing.assert_close(targets, pooled.float().reshape(-1, 24), rtol=0, atol=0)


def test_micro_batches_add_up_to_the_step() -> None:
    """Each row alone, normalised by the step's images, sums to the whole batch's loss."""
    model = _model()
    b = _batch()
    with torch.no_grad():
        whole = model(**b).aux_losses[IMAGE_REGRESSION]
        parts = []
        for rows, images in ((slice(0, 1), slice(0, 2)), (slice(1, 2), slice(2, 4))):
            part = {k: v[rows] for k, v in b.items() if k != "pixel_values"}
            out = model(**part, pixel_values=b["pixel_values"][images], num_images=4)
            parts.append(out.aux_losses[IMAGE_REGRESSION])
    torch.testing.assert_close(sum(parts), whole)


def test_targets_carry_no_gradient_and_a_text_batch_still_reaches_the_head() -> None:
    model = _model().train()
    b = _batch()
    _, targets = model.image_tokens_and_targets(b["pixel_values"])
    assert targets is not None and not targets.requires_grad
    text = {k: v[:1, :3] for k, v in b.items() if k != "pixel_values"}
    out = model(**text)
    assert out.aux_losses[IMAGE_REGRESSION].item() == 0.0
    (out.loss + out.aux_losses[IMAGE_REGRESSION]).backward()
    assert model.regress.weight.grad is not None  # FSDP / DDP need every weight in the graph


def test_generation_equals_a_full_forward_on_what_it_generated() -> None:
    """Cached, left-padded generation of Q features: a full forward over prompt + the
    projected features regresses the same features at every step."""
    model = _model()
    prompts = [[1, 5, 6, 7], [1, 9]]
    feats = generate_image_features(model, prompts, pad_token_id=0)
    assert feats.shape == (2, Q, 24)
    for prompt, f in zip(prompts, feats):
        with torch.no_grad():
            embeds = torch.cat(
                [model.embed(torch.tensor([prompt]), None), model.connector.proj(f[None, :-1])],
                dim=1,
            )
            hidden = model.decoder(inputs_embeds=embeds, return_hidden=True)
            again = model.regress(hidden[0, len(prompt) - 1 :])
        torch.testing.assert_close(again, f, rtol=1e-5, atol=1e-5)
    # each prompt alone gives the same features as in the padded batch
    alone = generate_image_features(model, prompts[1:], pad_token_id=0)
    torch.testing.assert_close(alone[0], feats[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"connector": {"type": "c_abstractor", "num_tokens": 4}}, r"model\.connector\.type"),
        ({"image_layout": ImageLayoutConfig(type="anyres")}, r"model\.image_layout\.type"),
        ({"regression_loss": "l2"}, r"model\.regression_loss='l2' is not one of l1, mse"),
    ],
)
def test_emu2_refuses_what_it_cannot_regress(model: dict, message: str) -> None:
    cfg = _config()
    for k, v in model.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=message):
        validate_model(cfg)


def test_other_families_refuse_a_regression_loss() -> None:
    with pytest.raises(ConfigError, match=r"model\.regression_loss=mse: model\.family=mm1"):
        _config("mm1", regression_loss="mse")


def test_info_describes_the_regression() -> None:
    text = family_spec("emu2").describe(_config())
    assert "avgpool to 4 features" in text and "regresses the next feature (l1)" in text


def test_the_summary_counts_the_regression_head() -> None:
    from mm1.models.summary import summarize

    cfg = _config()
    s, plain = summarize(cfg), summarize(_config("mm1"))
    assert s.heads == 32 * 24 + 24 and plain.heads == 0
    assert s.total == sum(p.numel() for p in _model().parameters())
    assert s.image_flops == plain.image_flops + 6 * s.heads * Q  # once per image slot
