"""Behaviour of the encoder, connectors, decoder and the MM1 model on tiny CPU configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mm1.batch import IGNORE_INDEX
from mm1.config import VisionConfig
from mm1.models import decoder as decoder_module
from mm1.models.connectors import CONNECTORS, CAbstractorConfig, build_connector
from mm1.models.decoder import Decoder
from mm1.models.kv_cache import KVCache
from mm1.models.mllm import MM1
from mm1.models.vision import VisionTransformer


def make_doc(model: MM1, text: list[int], n_images: int, gen: torch.Generator):
    """Token ids of a document: images (Q slots each) between text runs; labels shifted."""
    img, q = model.image_token_id, model.num_image_tokens
    ids: list[int] = []
    for i in range(n_images):
        ids += text[i::n_images] + [img] * q
    ids += text
    ids_t = torch.tensor(ids)
    labels = torch.full_like(ids_t, IGNORE_INDEX)
    nxt = ids_t[1:]
    labels[:-1] = torch.where(nxt == img, IGNORE_INDEX, nxt)
    pixels = torch.randn(n_images, 3, 32, 32, generator=gen)
    return ids_t, labels, pixels


def pack(docs, total: int, pad_id: int = 0):
    ids = torch.full((1, total), pad_id)
    labels = torch.full((1, total), IGNORE_INDEX)
    pos = torch.zeros(1, total, dtype=torch.long)
    doc_ids = torch.full((1, total), len(docs))  # padding is its own document
    start = 0
    for d, (i, lab, _) in enumerate(docs):
        n = len(i)
        ids[0, start : start + n], labels[0, start : start + n] = i, lab
        pos[0, start : start + n] = torch.arange(n)
        doc_ids[0, start : start + n] = d
        start += n
    pixels = torch.cat([p for _, _, p in docs])
    return ids, labels, pos, doc_ids, pixels


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_connector_shapes(connector: str, tiny_model_config) -> None:
    cfg = tiny_model_config(connector)
    grid = cfg.vision.grid
    module = build_connector(cfg.connector, 32, grid, 48)
    out = module(torch.randn(3, grid * grid, 32))
    assert out.shape == (3, module.num_tokens, 48)
    assert module.num_tokens == cfg.num_image_tokens


def test_c_abstractor_structure() -> None:
    cfg = CAbstractorConfig(num_tokens=4, hidden=24, depth=2)
    m = build_connector(cfg, 16, 4, 40)
    assert len(m.s1) == 2 and len(m.s2) == 2
    first = m.s1[0]
    # Dv != hidden: a projecting shortcut; the second block keeps identity
    assert isinstance(first.shortcut, torch.nn.Sequential)
    assert isinstance(m.s1[1].shortcut, torch.nn.Identity)
    assert first.conv2[0].groups == 24  # depthwise
    assert first.se.fc1.out_channels == round(0.25 * 16)
    assert [type(x).__name__ for x in m.readout] == ["Linear", "SiLU", "Linear"]
    # block norms run as timm's LayerNormAct2d, eps 1e-5 (tests/models/test_c_abstractor.py)
    norms = [x for x in m.modules() if isinstance(x, torch.nn.LayerNorm)]
    assert norms and all(x.eps == 1e-5 for x in norms)
    # depth 0: pool + MLP on the raw features
    m0 = build_connector(CAbstractorConfig(num_tokens=4, depth=0), 16, 4, 40)
    assert len(m0.s1) == 0 and m0.readout[0].in_features == 16


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_each_connector_overfits_a_tiny_batch(connector: str, tiny_model_config) -> None:
    torch.manual_seed(0)
    model = MM1(tiny_model_config(connector))
    gen = torch.Generator().manual_seed(0)
    docs = [make_doc(model, [5, 6, 7, 8, 9, 10], 1, gen) for _ in range(2)]
    ids, labels, pos, doc_ids, pixels = pack(docs, sum(len(d[0]) for d in docs))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(ids, labels, pos, doc_ids, pixels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"


@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_vision_encoder_layout(variant: str) -> None:
    cfg = VisionConfig(
        variant=variant, image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64
    )
    enc = VisionTransformer(cfg)
    assert (enc.cls_token is not None) == (variant == "clip")
    assert (enc.pre_norm is not None) == (variant == "clip")
    assert (enc.patch_embed.bias is not None) == (variant == "siglip")
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    # feature layer -2 builds one block fewer; 0 is the embeddings alone
    assert len(VisionTransformer(dataclasses.replace(cfg, feature_layer=-2)).blocks) == 2
    assert len(VisionTransformer(dataclasses.replace(cfg, feature_layer=0)).blocks) == 0
    with pytest.raises(ValueError, match="do not match"):
        enc(torch.randn(1, 3, 40, 40))


def test_position_embedding_resize_keeps_values_at_same_size_and_interpolates() -> None:
    clip = pytest.importorskip("transformers.models.clip.modeling_clip")
    cfg = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32)
    torch.manual_seed(0)
    enc = VisionTransformer(cfg)
    before = enc.pos_embed.detach().clone()
    enc.resize_position_embeddings(32)
    assert torch.equal(enc.pos_embed, before)
    enc.resize_position_embeddings(64)
    assert enc.pos_embed.shape == (1, 1 + 64, 16)
    # transformers' CLIP interpolates the same table the same way
    ref = clip.CLIPVisionEmbeddings(
        clip.CLIPVisionConfig(hidden_size=16, num_attention_heads=2, image_size=32, patch_size=8)
    )
    with torch.no_grad():
        ref.position_embedding.weight.copy_(before[0])
        want = ref.interpolate_pos_encoding(torch.zeros(1, 65, 16), 64, 64)
    torch.testing.assert_close(enc.pos_embed.detach(), want)
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 64, 16)


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_packed_equals_documents_alone_logits_and_loss(attention: str, tiny_model_config) -> None:
    torch.manual_seed(0)
    model = MM1(tiny_model_config("c_abstractor")).eval()
    model.decoder.cfg.attention = attention
    gen = torch.Generator().manual_seed(1)
    docs = [
        make_doc(model, [3, 4, 5, 6, 7], 2, gen),
        make_doc(model, [8, 9, 10], 0, gen),
        make_doc(model, [11, 12, 13, 14], 1, gen),
    ]
    total = sum(len(d[0]) for d in docs) + 5
    ids, labels, pos, doc_ids, pixels = pack(docs, total)
    packed = model(ids, labels, pos, doc_ids, pixels, return_logits=True)

    start, loss_sum, n = 0, 0.0, 0
    for i, lab, px in docs:
        alone = model(i[None], lab[None], pixel_values=px if len(px) else None, return_logits=True)
        torch.testing.assert_close(
            packed.logits[0, start : start + len(i)], alone.logits[0], atol=1e-5, rtol=1e-5
        )
        loss_sum += alone.loss_sum.item()
        n += alone.num_label_tokens
        start += len(i)
    assert packed.num_label_tokens == n
    assert packed.loss.item() == pytest.approx(loss_sum / n, rel=1e-5)


def test_varlen_single_document_rows_and_one_token_documents(tiny_model_config) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config().decoder
    sdpa = Decoder(dataclasses.replace(cfg, attention="sdpa"))
    varlen = Decoder(dataclasses.replace(cfg, attention="varlen"))
    varlen.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (3, 12))
    doc = torch.tensor([[0] * 12, [0, 1, 2] + [3] * 8 + [4], [0] * 6 + [1] * 6])
    pos = torch.stack(
        [torch.arange(12), torch.tensor([0, 0, 0, *range(8), 0]), torch.arange(12) % 6]
    )
    outs = []
    for model in (sdpa, varlen):
        logits = model(ids, position_ids=pos, document_ids=doc)
        logits.square().mean().backward()
        outs.append((logits, model.embed_tokens.weight.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-6, rtol=1e-4)


def test_document_grouping_scales_to_thousands_of_documents() -> None:
    """8 rows of 4,096 tokens in 2- to 9-token documents: the programme runs over distinct
    lengths, so it stays fast, and every token sits in exactly one group slot."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 10, (8 * 4096,), generator=gen)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[: 8 * 4096].view(8, 4096)
    groups = decoder_module.document_groups(doc)
    assert torch.equal(groups.index[groups.position], torch.arange(8 * 4096))
    assert len(groups.shapes) <= 8


def test_auto_attention_keeps_the_dense_mask_for_short_rows(monkeypatch, tiny_model_config) -> None:
    monkeypatch.setattr(decoder_module, "VARLEN_MIN_LEN", 25)
    monkeypatch.setattr(decoder_module, "document_groups", lambda d: pytest.fail("grouped"))
    model = Decoder(dataclasses.replace(tiny_model_config().decoder, attention="auto"))
    doc = torch.tensor([[0] * 7 + [1] * 17])
    assert model(torch.randint(0, 64, (1, 24)), document_ids=doc).shape[:2] == (1, 24)


def test_loss_on_labelled_positions_equals_cross_entropy_of_full_logits(tiny_model_config) -> None:
    """The head runs only where a label is; loss, per-token loss and every gradient equal
    the plain cross-entropy of the full logits."""
    torch.manual_seed(0)
    model = MM1(tiny_model_config("c_abstractor"))
    gen = torch.Generator().manual_seed(1)
    docs = [make_doc(model, [3, 4, 5, 6, 7], 2, gen), make_doc(model, [8, 9, 10], 1, gen)]
    ids, labels, pos, doc_ids, pixels = pack(docs, sum(len(d[0]) for d in docs) + 3)

    out = model(ids, labels, pos, doc_ids, pixels)
    assert out.logits is None
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    logits = model(ids, position_ids=pos, document_ids=doc_ids, pixel_values=pixels).logits
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    ref = ref.view_as(labels)
    n = int((labels != -100).sum())
    (ref.sum() / n).backward()
    assert out.num_label_tokens == n
    torch.testing.assert_close(out.token_loss, ref.detach())
    torch.testing.assert_close(out.loss.detach(), ref.sum().detach() / n)
    assert grads.keys() == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, msg=k)


def test_gradient_accumulation_equals_one_big_batch(tiny_model_config) -> None:
    torch.manual_seed(0)
    model = MM1(tiny_model_config("avgpool"))
    gen = torch.Generator().manual_seed(2)
    micro = []
    for k in range(3):  # micro-batches with different numbers of label tokens
        docs = [make_doc(model, list(range(3, 8 + 2 * k)), 1, gen) for _ in range(2)]
        micro.append(pack(docs, 48))
    total_labels = sum(int((m[1] != IGNORE_INDEX).sum()) for m in micro)

    model.zero_grad()
    for ids, labels, pos, doc, px in micro:
        model(ids, labels, pos, doc, px, num_label_tokens=total_labels).loss.backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    big = [torch.cat(t) for t in zip(*micro)]
    model(*big).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(accumulated[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_eager_and_sharded_initialisation_draw_the_same_distributions(tiny_model_config) -> None:
    """Built directly (`parallel: none` / DDP) or on meta then `init_weights` (FSDP), every
    weight matrix gets the same init std, `model.init_std` included."""
    cfg = dataclasses.replace(tiny_model_config("c_abstractor"), init_std=0.2)
    torch.manual_seed(0)
    eager = MM1(cfg)
    with torch.device("meta"):
        sharded = MM1(cfg)
    sharded.to_empty(device="cpu")
    sharded.init_weights()
    late = dict(sharded.named_parameters())
    for name, p in eager.named_parameters():
        if p.dim() == 2 and p.numel() >= 1024:
            assert p.std().item() == pytest.approx(late[name].std().item(), rel=0.25), name


def test_image_count_mismatch_is_an_error(tiny_model_config) -> None:
    model = MM1(tiny_model_config("avgpool"))
    img, q = model.image_token_id, model.num_image_tokens
    ids = torch.tensor([[1] + [img] * q + [2]])
    with pytest.raises(ValueError, match=r"hold 4 image slots but the 2 crops given make 8"):
        model(ids, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"hold 3 image slots"):
        model(torch.tensor([[1, img, img, img]]), pixel_values=torch.randn(1, 3, 32, 32))


def test_text_only_training_step_still_gives_encoder_gradients(tiny_model_config) -> None:
    model = MM1(tiny_model_config("avgpool")).train()
    ids = torch.tensor([[1, 2, 3, 4]])
    model(ids, labels=ids).loss.backward()
    assert model.vision.patch_embed.weight.grad is not None
    assert torch.count_nonzero(model.vision.patch_embed.weight.grad) == 0


def test_kv_cache_decoding_matches_full_forward(tiny_model_config) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config(qk_norm=True, qkv_bias=True).decoder
    dec = Decoder(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    full = dec(ids)
    cache = KVCache(cfg, 2, 12, "cpu", torch.float32)
    pieces = [dec(ids[:, :5], cache=cache)] + [
        dec(ids[:, i : i + 1], cache=cache) for i in range(5, 12)
    ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_attention(tiny_model_config) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config().decoder, sliding_window=4)
    dec = Decoder(cfg).eval()
    ids = torch.randint(0, 64, (1, 10))
    out = dec(ids)
    # changing a token more than `window` positions back cannot change the last logits
    ids2 = ids.clone()
    ids2[0, 2] = (ids[0, 2] + 1) % 64
    torch.testing.assert_close(dec(ids2)[0, -1], out[0, -1])
    assert not torch.allclose(dec(ids2)[0, 3], out[0, 3])


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings(tied: bool, tiny_model_config) -> None:
    torch.manual_seed(0)
    dec = Decoder(tiny_model_config(tie_embeddings=tied).decoder)
    old = dec.embed_tokens.weight.detach().clone()
    old_head = dec.lm_head.weight.detach().clone()
    dec.resize_token_embeddings(67)
    w = dec.embed_tokens.weight
    assert w.shape == (67, 32) and dec.cfg.vocab_size == 67
    assert torch.equal(w[:64], old)
    torch.testing.assert_close(w[64:], old.mean(0).expand(3, -1))
    assert (dec.lm_head.weight is w) == tied
    torch.testing.assert_close(dec.lm_head.weight[64:], old_head.mean(0).expand(3, -1))
    assert dec(torch.tensor([[66, 1]])).shape == (1, 2, 67)
    assert dec.lm_head.weight.device.type == "cpu"


def test_resize_into_a_padded_vocabulary_gives_added_tokens_fresh_rows(tiny_model_config) -> None:
    """A checkpoint's vocabulary padded past its tokenizer (64 rows, 56 tokens): mm1's added
    specials land on untrained padding rows (ids 56, 57), which must start at the mean of the
    trained rows; the unused padding past the new size is cut and not averaged in."""
    torch.manual_seed(0)
    dec = Decoder(tiny_model_config().decoder)
    old = dec.embed_tokens.weight.detach().clone()
    dec.resize_token_embeddings(58, new_ids=[56, 57])
    w = dec.embed_tokens.weight
    assert w.shape == (58, 32)
    assert torch.equal(w[:56], old[:56])
    torch.testing.assert_close(w[56:], old[:56].mean(0).expand(2, -1))
    torch.manual_seed(0)
    same = Decoder(tiny_model_config().decoder)
    same.resize_token_embeddings(64, new_ids=[60])  # same size: only the new id's row changes
    w, rest = same.embed_tokens.weight, [i for i in range(64) if i != 60]
    assert torch.equal(w[rest], old[rest])
    torch.testing.assert_close(w[60], old[rest].mean(0))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("window", [0, 5])
def test_flex_attention_equals_sdpa_on_packed_documents(window: int, tiny_model_config) -> None:
    """FlexAttention with a document block mask gives SDPA's logits (forward only: torch has no
    FlexAttention backward on CPU; the GPU benchmark trains through it)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config().decoder, sliding_window=window)
    sdpa = Decoder(cfg).eval()
    flex = Decoder(dataclasses.replace(cfg, attention="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (2, 24))
    doc = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 24])
    pos = torch.cat([torch.arange(7), torch.arange(10), torch.arange(7)]).expand(2, 24).clone()
    pos[1] = torch.arange(24)
    with torch.no_grad():
        expected = sdpa(ids, position_ids=pos, document_ids=doc)
        got = flex(ids, position_ids=pos, document_ids=doc)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("attention", "call_cost"), [("varlen", 0), ("varlen", 40), ("varlen", 4096), ("auto", 0)]
)
def test_varlen_attention_equals_sdpa_logits_and_gradients(
    monkeypatch, attention: str, call_cost: int, tiny_model_config
) -> None:
    """Free calls give one group per document length; a small call cost merges close
    lengths (padding inside a group); the default puts these short documents in one group.
    `auto` groups rows of at least VARLEN_MIN_LEN tokens (lowered here to this row's 24)."""
    monkeypatch.setattr(decoder_module, "_CALL_COST", call_cost)
    monkeypatch.setattr(decoder_module, "VARLEN_MIN_LEN", 24)
    calls = []
    grouping = decoder_module.document_groups
    monkeypatch.setattr(decoder_module, "document_groups", lambda d: calls.append(1) or grouping(d))
    torch.manual_seed(0)
    cfg = tiny_model_config().decoder
    sdpa = Decoder(dataclasses.replace(cfg, attention="sdpa"))
    varlen = Decoder(dataclasses.replace(cfg, attention=attention))
    varlen.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (2, 24))
    doc = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 20 + [1] * 4])
    pos = torch.stack(
        [
            torch.cat([torch.arange(7), torch.arange(10), torch.arange(7)]),
            torch.cat([torch.arange(20), torch.arange(4)]),
        ]
    )
    groups = decoder_module.document_groups(doc)
    sizes = groups.shapes
    calls.clear()
    expected = {0: [(1, 20), (1, 10), (2, 7), (1, 4)], 40: [(1, 20), (1, 10), (3, 7)]}
    assert sizes == expected.get(call_cost, [(5, 20)])
    outs = []
    for model in (sdpa, varlen):
        logits = model(ids, position_ids=pos, document_ids=doc)
        logits.square().mean().backward()
        outs.append((logits, {k: p.grad for k, p in model.named_parameters()}))
    assert len(calls) == 1  # the varlen model grouped once per forward; sdpa never
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for k, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][k], grad, atol=1e-6, rtol=1e-4, msg=k)


def test_compiled_blocks_with_grouped_attention_equal_eager(tiny_model_config) -> None:
    """`train.compile` compiles each block; grouped attention (data-dependent shapes) runs
    eagerly inside it through a graph break, and the results stay those of the eager model."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config().decoder, attention="varlen")
    eager = Decoder(cfg)
    compiled = Decoder(cfg)
    compiled.load_state_dict(eager.state_dict())
    for i, block in enumerate(compiled.layers):
        compiled.layers[i] = torch.compile(block)
    ids = torch.randint(0, 64, (2, 24))
    doc = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 20 + [1] * 4])
    outs = []
    for model in (eager, compiled):
        logits = model(ids, document_ids=doc)
        logits.square().mean().backward()
        outs.append((logits, model.embed_tokens.weight.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-6, rtol=1e-4)
