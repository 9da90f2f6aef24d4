"""The chameleon family: a frozen VQ tokenizer's codes as tokens of one vocabulary with the
text's, a cross-entropy on the image codes beside the text's. Checked against the loss written
out by hand, against itself (accumulation; cached generation == a full forward on what it
generated), and for what text generation may write (never an image code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm1.batch import IGNORE_INDEX
from mm1.config import (
    IMAGE_CODES,
    ConfigError,
    DecoderConfig,
    ImageLayoutConfig,
    ModelConfig,
    VisionConfig,
    VQConfig,
    validate_model,
)
from mm1.models.chameleon import Chameleon, generate_image_codes
from mm1.models.family import family_spec
from mm1.models.generation import generate
from tests.models.family_batches import two_packed_rows

VOCAB, IMG, K = 64, 63, 12  # text vocabulary (the image slot id its last), codebook size
Q = 4  # a 16-px image, 8x down: 2 x 2 codes


def _config(**model: object) -> ModelConfig:
    cfg = ModelConfig(
        family="chameleon",
        vision=VisionConfig(image_size=16, patch_size=8),
        vq=VQConfig(channels=[8, 8, 8], codebook_size=K, code_dim=4),
        decoder=DecoderConfig(
            vocab_size=VOCAB, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64, max_seq_len=64
        ),
        image_layout=ImageLayoutConfig(type="single"),
        **model,  # type: ignore[arg-type]
    )
    validate_model(cfg)
    return cfg


def _model() -> Chameleon:
    torch.manual_seed(0)
    return family_spec("chameleon").model(_config()).eval()


def _batch() -> dict[str, torch.Tensor]:
    return two_packed_rows(IMG, Q, 16)


def test_the_vocabulary_holds_the_codes_after_the_text() -> None:
    model = _model()
    assert model.decoder.embed_tokens.weight.shape == (VOCAB + K, 32)
    assert model.code_offset == VOCAB and model.num_image_tokens == Q
    px = _batch()["pixel_values"]
    ids = model.image_codes(px)
    torch.testing.assert_close(ids, model.vision.encode(px) + VOCAB)
    # an image's tokens are its codes' embeddings: the very rows the head scores them with
    torch.testing.assert_close(model.image_features(px), model.decoder.embed(ids))
    assert not any(p.requires_grad for p in model.vision.parameters())  # frozen


def test_the_image_loss_is_each_codes_cross_entropy_written_out() -> None:
    model = _model()
    b = _batch()
    with torch.no_grad():
        out = model(**b, return_logits=True)
    codes = model.image_codes(b["pixel_values"]).reshape(-1)
    total, k, counted = torch.tensor(0.0), 0, 0
    ids, doc = b["input_ids"], b["document_ids"]
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[r, t] != IMG:
                continue
            if t > 0 and doc[r, t - 1] == doc[r, t]:  # over the whole vocabulary
                total += F.cross_entropy(out.logits[r, t - 1], codes[k])
                counted += 1
            k += 1
    assert counted == 4 * Q - 1  # the image opening row 0's second document: its first code
    torch.testing.assert_close(out.aux_losses[IMAGE_CODES], total / (4 * Q))
    # the text's loss is the text's alone, as an MM1 model's
    text = b["labels"] != IGNORE_INDEX
    want = F.cross_entropy(out.logits[text], b["labels"][text])
    torch.testing.assert_close(out.loss, want)


def test_micro_batches_add_up_to_the_step() -> None:
    model = _model()
    b = _batch()
    with torch.no_grad():
        whole = model(**b).aux_losses[IMAGE_CODES]
        parts = []
        for rows, images in ((slice(0, 1), slice(0, 2)), (slice(1, 2), slice(2, 4))):
            part = {k: v[rows] for k, v in b.items() if k != "pixel_values"}
            out = model(**part, pixel_values=b["pixel_values"][images], num_images=4)
            parts.append(out.aux_losses[IMAGE_CODES])
    torch.testing.assert_close(sum(parts), whole)


def test_training_reaches_the_code_embeddings_and_never_the_tokenizer() -> None:
    model = _model().train()
    out = model(**_batch())
    (out.loss + out.aux_losses[IMAGE_CODES]).backward()
    grad = model.decoder.embed_tokens.weight.grad
    assert grad is not None and grad[VOCAB:].abs().sum() > 0
    assert all(p.grad is None for p in model.vision.parameters())
    text = {k: v[:1, :3] for k, v in _batch().items() if k != "pixel_values"}
    assert model(**text).aux_losses[IMAGE_CODES].item() == 0.0


def test_text_generation_never_writes_an_image_code() -> None:
    """With the code rows scaled up, the full head's argmax is always a code; text generation
    masks them out and writes text tokens only (the same as argmax over the text's logits)."""
    model = _model()
    with torch.no_grad():
        model.decoder.embed_tokens.weight[VOCAB:] *= 50
        if not model.cfg.decoder.tie_embeddings:
            model.decoder.lm_head.weight[VOCAB:] *= 50
        logits = model(torch.tensor([[1, 5, 6]])).logits
    assert int(logits[0, -1].argmax()) >= VOCAB
    assert model.text_logits(logits).shape[-1] == VOCAB
    out = generate(model, [[1, 5, 6]], None, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    assert all(0 <= t < VOCAB for t in out[0])


def test_image_generation_equals_a_full_forward_on_what_it_generated() -> None:
    """Cached, left-padded greedy generation of Q codes: a full forward over prompt + the codes
    picks the same code at every step among the codes (text masked out)."""
    model = _model()
    prompts = [[1, 5, 6, 7], [1, 9]]
    codes = generate_image_codes(model, prompts, pad_token_id=0)
    assert codes.shape == (2, Q) and int(codes.min()) >= 0 and int(codes.max()) < K
    for prompt, c in zip(prompts, codes):
        ids = torch.tensor([prompt + (c[:-1] + VOCAB).tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 :, VOCAB:]
        assert logits.argmax(-1).tolist() == c.tolist()
    alone = generate_image_codes(model, prompts[1:], pad_token_id=0)
    assert alone[0].tolist() == codes[1].tolist()
    assert model.vision.decode(codes).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("guidance", [3.0, -0.5])
def test_guided_generation_equals_guidance_written_out_over_full_forwards(guidance: float) -> None:
    """Classifier-free guidance, cached and left-padded (the unconditional prompt shorter than
    both captions): at every step the code is the argmax of u + g (c - u), c and u the code
    logits of full forwards over each prompt and the codes so far."""
    model = _model()
    prompts, uncond = [[1, 5, 6, 7], [1, 9, 4]], [1]
    codes = generate_image_codes(model, prompts, 0, guidance_scale=guidance, unconditional=uncond)
    plain = generate_image_codes(model, prompts, 0)
    assert not torch.equal(codes, plain)  # guidance changed something
    for prompt, c in zip(prompts, codes):
        fed = (c[:-1] + VOCAB).tolist()
        with torch.no_grad():
            cond = model(torch.tensor([prompt + fed])).logits[0, len(prompt) - 1 :, VOCAB:]
            free = model(torch.tensor([uncond + fed])).logits[0, len(uncond) - 1 :, VOCAB:]
        assert (free + guidance * (cond - free)).argmax(-1).tolist() == c.tolist()


def test_guidance_one_is_the_prompt_alone_and_zero_the_unconditional_prompt_alone() -> None:
    model = _model()
    prompts, uncond = [[1, 5, 6, 7], [1, 9, 4]], [1]
    plain = generate_image_codes(model, prompts, 0)
    assert torch.equal(generate_image_codes(model, prompts, 0, unconditional=uncond), plain)
    free = generate_image_codes(model, prompts, 0, guidance_scale=0.0, unconditional=uncond)
    assert free.tolist() == generate_image_codes(model, [uncond] * 2, 0).tolist()
    with pytest.raises(ValueError, match="unconditional prompt"):
        generate_image_codes(model, prompts, 0, guidance_scale=2.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_layout": ImageLayoutConfig(type="anyres")}, r"model\.image_layout\.type=anyres"),
        ({"vq": VQConfig(channels=[8, 8, 8, 8, 8])}, r"not a multiple of .*= 32"),
        ({"vq": VQConfig(channels=[])}, r"model\.vq\.channels=\[\]"),
        ({"vq": VQConfig(codebook_size=0)}, r"model\.vq\.codebook_size=0 must be positive"),
        ({"regression_loss": "mse"}, r"model\.regression_loss=mse: model\.family=chameleon"),
    ],
)
def test_chameleon_refuses_what_it_cannot_read(change: dict, message: str) -> None:
    cfg = _config()
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=message):
        validate_model(cfg)


def test_the_summary_counts_the_tokenizer_forward_only_and_the_codes_rows() -> None:
    from mm1.models.summary import summarize

    s = summarize(_config())
    model = _model()
    assert s.total == sum(p.numel() for p in model.parameters())
    assert s.embeddings == (VOCAB + K) * 32 * (1 if model.cfg.decoder.tie_embeddings else 2)
    assert s.image_tokens == Q and s.heads == 0
    assert "8x down, 12 codes" in family_spec("chameleon").describe(_config())


def test_rices_warns_that_it_ranks_by_the_codes_embeddings(caplog) -> None:
    from mm1.eval.demos import warn_if_rices_is_weak

    with caplog.at_level("WARNING", logger="mm1.eval.demos"):
        warn_if_rices_is_weak(_model(), "rices")
    messages = [r.getMessage() for r in caplog.records if r.name == "mm1.eval.demos"]
    assert len(messages) == 1 and "the mean embedding of each image's codes" in messages[0]


def test_code_rows_are_placed_by_offset_not_where_a_sources_padding_ends() -> None:
    """A source with more rows than the text vocabulary (a padded transformers vocabulary)
    gives its first V rows to the text; the K code rows start at the text rows' mean."""
    from mm1.models.state_transforms import LoadContext, vocabulary

    key = "decoder.embed_tokens.weight"
    padded = torch.randn(VOCAB + 3, 32)
    expected = {key: torch.Size([VOCAB + K, 32])}
    ctx = LoadContext(source="src", parts=("decoder",), expected=expected, model=_config())
    out = vocabulary({key: padded}, ctx)[key]
    assert out.shape == (VOCAB + K, 32) and torch.equal(out[:VOCAB], padded[:VOCAB])
    torch.testing.assert_close(out[VOCAB:], padded[:VOCAB].mean(0).expand(K, -1))
    same = torch.randn(VOCAB + K, 32)  # a chameleon source of the model's shape: kept
    assert torch.equal(vocabulary({key: same}, ctx)[key], same)
