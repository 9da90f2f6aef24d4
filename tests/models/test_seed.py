"""SEED's tokenizer and `model.family: seed`: the causal Q-Former's codes depend only on the
image and the queries before them; the tokenizer's loss written out term by term; what trains
and what stays frozen; the family's vocabulary, image tokens and checks. (The image codes'
cross-entropy and generation are chameleon's, tested in test_chameleon.py; the 2-rank loss in
tests/train/test_contrastive.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm1.config import (
    ConfigError,
    DecoderConfig,
    ImageLayoutConfig,
    ModelConfig,
    SEEDConfig,
    VisionConfig,
    validate_model,
)
from mm1.models.contrastive import clip_loss
from mm1.models.family import family_spec
from mm1.models.seed import SEED
from tests.models.seed_tiny import SEED_CFG, VISION, VOCAB, E, K, Q, seed_tokenizer_model


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(n, 3, 16, 16, generator=g),
        torch.randint(0, VOCAB, (n, 6), generator=g),
        torch.randint(2, 7, (n,), generator=g),
    )


def test_query_i_reads_the_image_and_the_queries_before_it_only() -> None:
    tok = seed_tokenizer_model().vision.eval()
    pixels = _batch()[0]
    features = tok.features(pixels)
    before = tok.causal_embeddings(features)
    with torch.no_grad():
        tok.queries[:, 3:] += 1.0  # change the last queries
    after = tok.causal_embeddings(features)
    torch.testing.assert_close(after[:, :3], before[:, :3])
    assert not torch.allclose(after[:, 3:], before[:, 3:])
    # each query reads the image: another image, other embeddings from the first query on
    other = tok.causal_embeddings(tok.features(pixels.flip(0)))
    assert not torch.allclose(other[:, 0], after[:, 0])
    codes = tok.encode(pixels)
    assert codes.shape == (4, Q) and codes.dtype == torch.long
    torch.testing.assert_close(codes, tok.codes_of(tok.latents(after)))


def test_the_tokenizer_loss_is_its_four_terms_written_out() -> None:
    """Eval mode (no codebook update): contrastive on the last causal embedding against the
    frozen text tower, 1 - cosine of the decoded causal embeddings, 1 - cosine of the generation
    embedding to CLIP's image embedding, and beta x commitment."""
    model = seed_tokenizer_model().eval()
    pixels, ids, lengths = _batch()
    out = model(pixels, ids, lengths)
    tok = model.vision
    with torch.no_grad():
        feats = tok.vit(pixels)
        causal = tok.causal_embeddings(feats)
        z = F.normalize(tok.to_code(causal), dim=-1)
        codes = (z @ tok.codes.t()).argmax(-1)  # the nearest code by cosine
        e = tok.codes[codes]
        decoded = tok.decode_vectors(e)
        text = model.text_proj(model.text(ids, lengths))
        scale = model.logit_scale.exp()
        contrastive = clip_loss(model.contrast_proj(causal[:, -1]), text, scale)
        recon = (1 - F.cosine_similarity(decoded, causal, dim=-1)).mean()
        generated = tok.generation_head(decoded.mean(1))
        clip_image = tok.image_proj(feats.mean(1))
        generation = (1 - F.cosine_similarity(generated, clip_image, dim=-1)).mean()
        commitment = (z - e).square().sum(-1).mean()
    want = contrastive + recon + generation + 0.25 * commitment
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    for name, value in (("contrastive", contrastive), ("generation", generation)):
        assert out.metrics[name] == pytest.approx(float(value), rel=1e-5)
    torch.testing.assert_close(tok.decode(codes), generated, rtol=1e-5, atol=1e-6)


def test_the_gradients_are_the_written_out_losses_with_their_stop_gradients() -> None:
    """The reconstruction's target and the commitment's codes carry no gradient, and the
    decoder's gradient passes the quantiser straight through to the Q-Former."""
    model = seed_tokenizer_model().eval()
    pixels, ids, lengths = _batch()
    model(pixels, ids, lengths).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    tok = model.vision
    feats = tok.vit(pixels)
    causal = tok.causal_embeddings(feats)
    z = F.normalize(tok.to_code(causal), dim=-1)
    e = tok.codes[(z.detach() @ tok.codes.t()).argmax(-1)]
    decoded = tok.decode_vectors(z + (e - z).detach())
    text = model.text_proj(model.text(ids, lengths))
    loss = (
        clip_loss(model.contrast_proj(causal[:, -1]), text, model.logit_scale.exp())
        + (1 - F.cosine_similarity(decoded, causal.detach(), dim=-1)).mean()
        + (
            1
            - F.cosine_similarity(
                tok.generation_head(decoded.mean(1)), tok.image_proj(feats.mean(1)), dim=-1
            )
        ).mean()
        + 0.25 * (z - e).square().sum(-1).mean()
    )
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_clip_towers_stay_frozen_and_everything_else_learns() -> None:
    model = seed_tokenizer_model().train()
    pixels, ids, lengths = _batch()
    before = model.vision.codes.clone()
    model(pixels, ids, lengths, torch.Generator().manual_seed(0)).loss.backward()
    frozen = ("vision.vit.", "vision.image_proj.", "text.", "text_proj.")
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            assert not p.requires_grad and p.grad is None, name
        else:  # straight through: the Q-Former learns from the decoder's losses too
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not torch.equal(model.vision.codes, before)  # the EMA step of a training forward
    model.eval()
    frozen_codes = model.vision.codes.clone()
    model(pixels, ids, lengths)
    assert torch.equal(model.vision.codes, frozen_codes)  # evaluation leaves it alone


def _family_config(**model: object) -> ModelConfig:
    cfg = ModelConfig(
        family="seed",
        vision=VISION,
        seed=SEED_CFG,
        decoder=DecoderConfig(
            vocab_size=VOCAB, dim=32, layers=1, heads=4, kv_heads=2, ffn_dim=64, max_seq_len=64
        ),
        image_layout=ImageLayoutConfig(type="single"),
        **model,  # type: ignore[arg-type]
    )
    validate_model(cfg)
    return cfg


def test_a_seed_model_reads_each_image_as_its_tokenizers_codes_in_the_vocabulary() -> None:
    torch.manual_seed(0)
    model = family_spec("seed").model(_family_config()).eval()
    assert isinstance(model, SEED) and model.num_image_tokens == Q
    assert model.decoder.embed_tokens.weight.shape[0] == VOCAB + K and model.code_offset == VOCAB
    pixels = _batch()[0]
    ids = model.image_codes(pixels)
    torch.testing.assert_close(ids, model.vision.encode(pixels) + VOCAB)
    torch.testing.assert_close(model.image_features(pixels), model.decoder.embed(ids))
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert model.vision.decode(ids - VOCAB).shape == (4, E)  # generation embeddings
    with pytest.raises(ValueError, match="2 codes per image; the tokenizer writes 5"):
        model.vision.decode(ids[:, :2] - VOCAB)
    assert family_spec("seed").codebook_size(model.cfg) == K


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": SEEDConfig(num_queries=0)}, r"model\.seed\.num_queries=0 must be positive"),
        ({"seed": SEEDConfig(embed_dim=-1)}, r"model\.seed\.embed_dim=-1 must be positive"),
        (
            {"image_layout": ImageLayoutConfig(type="anyres")},
            r"model\.image_layout\.type=anyres: model\.family=seed reads each image as one",
        ),
        (
            {"vision": VisionConfig(image_size=16, patch_size=8, width=15, heads=2)},
            r"model\.vision\.width=15 is not divisible by heads=2",
        ),
    ],
)
def test_seed_configs_are_checked_naming_the_key(change: dict, message: str) -> None:
    fields = {"seed": SEED_CFG, "vision": VISION, "image_layout": ImageLayoutConfig("single")}
    with pytest.raises(ConfigError, match=message):
        cfg = ModelConfig(
            family="seed",
            decoder=DecoderConfig(vocab_size=VOCAB, dim=32, layers=1, heads=4, kv_heads=2),
            **{**fields, **change},
        )
        validate_model(cfg)


def test_summary_counts_the_frozen_tokenizer_forward_only_and_rices_warns(caplog) -> None:
    """A seed model has a ViT, yet its image tokens are codes: RICES ranks by their mean
    embedding (warned), and `mm1 info` counts the tokenizer's FLOPs once (no backward)."""
    from mm1.eval.demos import warn_if_rices_is_weak
    from mm1.models.summary import summarize

    torch.manual_seed(0)
    model = family_spec("seed").model(_family_config()).eval()
    with caplog.at_level("WARNING", logger="mm1.eval.demos"):
        warn_if_rices_is_weak(model, "rices")
    messages = [r.getMessage() for r in caplog.records if r.name == "mm1.eval.demos"]
    assert len(messages) == 1 and "model.family=seed reads images as discrete codes" in messages[0]
    s = summarize(_family_config(), 64)
    assert s.vision == sum(p.numel() for p in model.vision.parameters())
    assert s.connector == 0 and s.image_tokens == Q and s.heads == 0
    assert "causal Q-Former (2 blocks) -> 5 codes of 12" in family_spec("seed").describe(model.cfg)
