"""Packing: pieces respect length, image and boundary rules; nothing is lost; batches are exact."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from mm1.batch import IGNORE_INDEX
from mm1.data.packing import (
    Packer,
    PackStats,
    UnfitDocument,
    _last_cut,
    collate,
    cut_points,
    drop_images,
    slice_document,
    split_document,
)
from mm1.data.tokenizer import TokenizedDocument

IMG = 99
Q = 6


def make_doc(kind: str, layout: list[int | str], doc_id: str, q: int = Q) -> TokenizedDocument:
    """layout: ints are runs of text tokens, "i" an image block of q slots."""
    ids: list[int] = [1]  # BOS
    spans, images = [], []
    for part in layout:
        if part == "i":
            spans.append((len(ids), len(ids) + q))
            ids += [IMG] * q
            images.append(Image.new("RGB", (4, 4), (len(images), 0, 0)))
        else:
            ids += [10 + (len(ids) + k) % 50 for k in range(part)]
    ids.append(2)  # EOS
    mask = [t != IMG and t != 1 for t in ids]
    return TokenizedDocument(ids, mask, images, kind, doc_id, spans)


def random_doc(rng: random.Random, k: int) -> TokenizedDocument:
    source = rng.choices(["captions", "interleaved", "text"], [45, 45, 10])[0]
    if source == "captions":
        layout = ["i", rng.randint(3, 12)]
    elif source == "text":
        layout = [rng.randint(5, 80)]
    else:
        layout = []
        for _ in range(rng.randint(1, 5)):
            layout += [rng.randint(2, 20), "i"]
        layout.append(rng.randint(2, 20))
    return make_doc(source, layout, f"d{k}")


def test_split_never_cuts_an_image_and_caps_length() -> None:
    doc = make_doc("interleaved", [5, "i", 3, "i", "i", 7, "i", 2], "x")
    pieces, dropped = split_document(doc, seq_len=12, max_images=16)
    assert dropped == 0
    assert all(len(p.input_ids) <= 12 for p in pieces)
    assert sum(len(p.input_ids) for p in pieces) == len(doc.input_ids)
    assert [t for p in pieces for t in p.input_ids] == doc.input_ids
    for p in pieces:
        for a, b in p.image_spans:
            assert p.input_ids[a:b] == [IMG] * Q
        assert p.input_ids.count(IMG) == Q * len(p.images)


@pytest.mark.parametrize("kind", ["captions", "sft"])
def test_caption_pairs_and_conversations_keep_their_head(kind: str) -> None:
    """Longer than a sequence, they lose their tail (as LLaVA truncates): they were cut at the
    image's edge, and the caption or the answers then trained in a piece without the image."""
    doc = make_doc(kind, ["i", 20], "c")
    pieces, _ = split_document(doc, seq_len=10, max_images=4)
    assert len(pieces) == 1
    assert pieces[0].input_ids == doc.input_ids[:10] and len(pieces[0].images) == 1
    assert cut_points(doc, anywhere=False) == [1, 1 + Q]
    packer = Packer(seq_len=10, max_images=4)
    packer.add(doc)
    assert (packer.stats.truncated, packer.stats.tokens_truncated) == (1, len(doc) - 10)


def test_a_conversation_that_cannot_be_truncated_usefully_is_unfit() -> None:
    from mm1.data.packing import UnfitDocument

    doc = make_doc("sft", [2, "i", 20], "c")
    doc.target_mask = [i >= 10 for i in range(len(doc.input_ids))]  # the answer from token 10
    with pytest.raises(UnfitDocument, match="nothing to learn within data.seq_len=8") as err:
        split_document(doc, seq_len=8, max_images=4)
    assert err.value.reason == "too_long"
    many = make_doc("sft", ["i", "i", "i", 2], "m")
    with pytest.raises(UnfitDocument, match="has 3 images, more than") as err:
        split_document(many, seq_len=100, max_images=2)
    assert err.value.reason == "too_many_images"
    _, dropped = split_document(make_doc("interleaved", ["i", "i", "i", 2], "x"), 100, 2)
    assert dropped == 1  # an interleaved document keeps its first images


def test_images_over_the_cap_are_dropped_with_their_slots() -> None:
    doc = make_doc("interleaved", [2, "i", 2, "i", 2, "i", 2], "x")
    kept = drop_images(doc, 1)
    assert len(kept.images) == 1 and kept.input_ids.count(IMG) == Q
    assert len(kept.input_ids) == len(doc.input_ids) - 2 * Q
    _, dropped = split_document(doc, seq_len=100, max_images=2)
    assert dropped == 1


def test_packer_loses_nothing_and_respects_limits() -> None:
    rng = random.Random(0)
    docs = [random_doc(rng, k) for k in range(300)]
    packer = Packer(seq_len=64, max_images=3, buffer_size=16)
    seqs = []
    it = iter(docs)
    exhausted = False
    while True:
        while packer.wants_more() and not exhausted:
            d = next(it, None)
            if d is None:
                exhausted = True
            else:
                packer.add(d, (0, 0, int(d.id[1:])))
        if not packer.buffer:
            break
        seqs.append(packer.next_sequence())
    emitted: dict[str, list[int]] = {}
    for seq in seqs:
        assert sum(len(p) for p in seq) <= 64
        assert sum(p.num_images for p in seq) <= 3
        for p in seq:
            emitted.setdefault(p.doc.id, []).extend(p.doc.input_ids)
    for d in docs:  # every token of every document, in order (after the image cap)
        pieces, _ = split_document(d, 64, 3)
        assert emitted[d.id] == [t for p in pieces for t in p.input_ids]
    stats = packer.stats.to_dict()
    assert stats["packing_efficiency"] > 0.9
    assert sum(stats["documents"].values()) == len(docs)


def test_collate_labels_positions_documents() -> None:
    a = make_doc("text", [4], "a")
    b = make_doc("captions", ["i", 3], "b")
    packer = Packer(seq_len=24, max_images=4)
    packer.add(a, (1, 0, 0))  # (source index, shard, record): from data.sources[1]
    packer.add(b, (0, 5, 7))
    seq = packer.next_sequence()
    batch = collate([seq], 24, pad_id=0, kind_index={"text": 2, "captions": 1})
    n_a, n_b = len(a.input_ids), len(b.input_ids)
    assert batch.input_ids[0, :n_a].tolist() == a.input_ids
    assert batch.labels[0, : n_a - 1].tolist() == a.input_ids[1:]
    assert batch.labels[0, n_a - 1] == IGNORE_INDEX  # no target across documents
    assert batch.position_ids[0, n_a : n_a + n_b].tolist() == list(range(n_b))
    assert set(batch.document_ids[0, : n_a + n_b].tolist()) == {0, 1}
    assert (batch.document_ids[0, n_a + n_b :] == 2).all()  # padding: its own document
    assert (batch.labels[0, n_a + n_b :] == IGNORE_INDEX).all()
    # image slots are never targets
    assert not ((batch.labels == IMG).any())
    # each token's kind and dataset; padding has neither
    expected = [2] * n_a + [1] * n_b + [-1] * (24 - n_a - n_b)
    assert batch.kind_ids[0].tolist() == expected
    assert batch.dataset_ids[0].tolist() == [1] * n_a + [0] * n_b + [-1] * (24 - n_a - n_b)


def test_filler_cut_resumes_where_it_stopped() -> None:
    packer = Packer(seq_len=20, max_images=2, min_fill=2)
    packer.add(make_doc("captions", ["i", 8], "c"), (0, 0, 0))  # 16 tokens
    packer.add(make_doc("text", [30], "t"), (1, 0, 5))  # 32 tokens: pieces of 20 and 12
    first = packer.next_sequence()
    assert [len(p) for p in first] == [16, 4]
    # the rest of piece 0 stays buffered, its reference records the 4 tokens used
    assert packer.buffer[0].ref == (1, 0, 5, 0, 4) and len(packer.buffer[0]) == 16
    assert packer.buffer[1].ref == (1, 0, 5, 1, 0) and len(packer.buffer[1]) == 12
    with pytest.raises(RuntimeError):
        Packer(8, 1).next_sequence()
    # without a reference (documents fed by hand) tail filling works too
    bare = Packer(seq_len=20, max_images=2, min_fill=2)
    bare.add(make_doc("captions", ["i", 8], "c"))
    bare.add(make_doc("text", [30], "t"))
    assert [len(p) for p in bare.next_sequence()] == [16, 4]
    assert bare.buffer[0].ref == (0, 4)


def test_collated_batch_trains_like_documents_alone() -> None:
    """A packed batch from the packer gives the same loss as its pieces one by one."""
    from mm1.config import ConnectorConfig, DecoderConfig, ModelConfig, VisionConfig
    from mm1.models.mllm import MM1

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
        connector=ConnectorConfig(type="avgpool", num_tokens=4),
        decoder=DecoderConfig(vocab_size=100, dim=16, layers=1, heads=2, kv_heads=1, ffn_dim=32),
        image_token_id=IMG,
    )
    docs = [make_doc("interleaved", [3, "i", 4], "a", q=4), make_doc("text", [6], "b", q=4)]
    model = MM1(cfg).eval()
    packer = Packer(seq_len=32, max_images=4)
    for d in docs:
        packer.add(d)
    seq = packer.next_sequence()
    pixels = torch.randn(1, 3, 16, 16)
    batch = collate([seq], 32, pad_id=0, pixel_values=pixels)
    packed = model(**batch.model_inputs())
    total, n = 0.0, 0
    for p in seq:
        ids = torch.tensor([p.doc.input_ids])
        out = model(
            ids, torch.tensor([p.doc.labels()]), pixel_values=pixels if p.num_images else None
        )
        total += out.loss_sum.item()
        n += out.num_label_tokens
    assert packed.loss.item() == pytest.approx(total / n, rel=1e-5)


def test_padding_of_sequences_the_image_cap_closed_is_counted() -> None:
    """Caption pairs of cheap images fill the image cap long before the length: that padding
    is the cap's (`mm1 data stats` says so); text-only sequences have none of it."""
    captions = [make_doc("captions", ["i", 4], f"c{k}", q=2) for k in range(40)]
    packer = Packer(seq_len=64, max_images=2, buffer_size=8)
    for d in captions[:8]:
        packer.add(d)
    packer.next_sequence()
    s = packer.stats
    assert s.padding > 30 and s.padding_image_cap == s.padding
    text = Packer(seq_len=64, max_images=2, buffer_size=8)
    text.add(make_doc("captions", [20], "t0"))  # no image: room left, image slots too
    text.next_sequence()
    assert text.stats.padding > 0 and text.stats.padding_image_cap == 0
    restored = type(s).from_dict(s.to_dict())
    assert restored.padding_image_cap == s.padding_image_cap


def test_a_filler_cut_that_takes_the_last_image_slot_counts_as_the_caps() -> None:
    """A caption pair leaves 16 tokens and one image slot; the interleaved document cut to fill
    them takes that slot (its head ends before its second image): the 5 tokens left are the
    image cap's padding."""
    packer = Packer(seq_len=64, max_images=2, buffer_size=8)
    packer.add(make_doc("captions", ["i", 40], "a"))  # 48 tokens, 1 image
    packer.add(make_doc("interleaved", [2, "i", 2, "i", 30], "b"))  # 48 tokens, 2 images
    seq = packer.next_sequence()
    assert [p.doc.id for p in seq] == ["a", "b"] and sum(p.num_images for p in seq) == 2
    assert packer.stats.padding == 5 and packer.stats.padding_image_cap == 5


def test_a_cut_inside_an_image_block_is_refused() -> None:
    doc = make_doc("interleaved", [2, "i", 2], "x")  # the image's slots are tokens 3..8
    assert slice_document(doc, 0, 3).input_ids == doc.input_ids[:3]
    with pytest.raises(ValueError, match="splits an image"):
        slice_document(doc, 0, 5)  # the end inside the image
    with pytest.raises(ValueError, match="splits an image"):
        slice_document(doc, 5, len(doc.input_ids))  # the start inside it


def test_an_image_block_longer_than_a_sequence_after_the_first_piece_is_unfit() -> None:
    doc = make_doc("interleaved", [5, "i", 2], "x", q=10)  # image slots 6..15, 19 tokens
    cuts = cut_points(doc, anywhere=True)
    assert _last_cut(cuts, 6, 8) is None  # no cut in (6, 14]: the image is in the way
    assert _last_cut(cuts, 0, 8) == 6
    with pytest.raises(UnfitDocument, match="image block longer than seq_len=8") as err:
        split_document(doc, seq_len=8, max_images=4)
    assert err.value.reason == "too_long"


def test_split_makes_as_few_pieces_as_the_length_allows() -> None:
    """A document of exactly two sequences is two full pieces, not three."""
    pieces, _ = split_document(make_doc("text", [38], "t"), seq_len=20, max_images=4)
    assert [len(p.input_ids) for p in pieces] == [20, 20]
    pieces, _ = split_document(make_doc("text", [28], "t"), seq_len=20, max_images=4)
    assert [len(p.input_ids) for p in pieces] == [20, 10]


def test_every_image_over_the_cap_is_counted_as_dropped() -> None:
    doc = make_doc("interleaved", [2, "i", "i", "i", "i", 2], "x")
    pieces, dropped = split_document(doc, seq_len=100, max_images=1)
    assert dropped == 3 and len(pieces[0].images) == 1
    packer = Packer(seq_len=100, max_images=1)
    packer.add(doc)
    assert packer.stats.images_dropped == 3


def test_truncation_limits_are_exact() -> None:
    # a conversation with as many images as the cap is kept whole
    sft = make_doc("sft", ["i", "i", 4], "s")
    assert split_document(sft, seq_len=100, max_images=2)[0] == [sft]
    # a caption pair that fits is not truncated
    packer = Packer(seq_len=20, max_images=2)
    packer.add(make_doc("captions", ["i", 5], "c"))
    assert (packer.stats.truncated, packer.stats.tokens_truncated) == (0, 0)
    # a head whose only target is its first token has nothing to learn: no token predicts it
    doc = make_doc("sft", [20], "h")
    doc.target_mask = [i == 0 or i >= 15 for i in range(len(doc.input_ids))]
    with pytest.raises(UnfitDocument, match="nothing to learn"):
        split_document(doc, seq_len=8, max_images=2)


def test_first_fit_takes_a_piece_that_fills_the_room_exactly() -> None:
    packer = Packer(seq_len=20, max_images=2)
    packer.add(make_doc("captions", [18], "c"))  # 20 tokens
    assert [len(p) for p in packer.next_sequence()] == [20]
    packer.add(make_doc("text", [8], "a"))
    packer.add(make_doc("text", [8], "b"))
    assert [len(p) for p in packer.next_sequence()] == [10, 10]
    assert packer.stats.padding == 0 and packer.stats.pieces_cut == 0


def test_tail_filling_cuts_only_text_and_interleaved_and_never_below_min_fill() -> None:
    # a room of exactly min_fill is filled
    packer = Packer(seq_len=20, max_images=2, min_fill=4)
    packer.add(make_doc("captions", ["i", 8], "c"))  # 16 tokens
    packer.add(make_doc("text", [30], "t"))
    assert [len(p) for p in packer.next_sequence()] == [16, 4]
    # caption pairs and conversations are never cut to fill a tail
    for kind in ("captions", "sft"):
        packer = Packer(seq_len=20, max_images=2, min_fill=2)
        packer.add(make_doc(kind, [10], "a"))  # 12 tokens
        packer.add(make_doc(kind, [10], "b"))
        assert [p.doc.id for p in packer.next_sequence()] == ["a"]
        assert packer.stats.padding == 8 and packer.stats.pieces_cut == 0
    # a head shorter than min_fill (the image comes too early) is not cut off
    packer = Packer(seq_len=26, max_images=2, min_fill=8)
    packer.add(make_doc("captions", [14], "c"))  # 16 tokens: room 10
    packer.add(make_doc("interleaved", [2, "i", 2], "x", q=10))  # cuts 1..3, then 13..15
    assert [p.doc.id for p in packer.next_sequence()] == ["c"]
    assert packer.stats.padding == 10 and packer.stats.pieces_cut == 0


def test_a_piece_cut_twice_records_every_token_already_used() -> None:
    """The loader rebuilds a buffered piece on resume as its tokens from `ref[-1]` on."""
    packer = Packer(seq_len=20, max_images=2, min_fill=2)
    packer.add(make_doc("captions", ["i", 8], "c1"), (0, 0, 0))  # 16 tokens
    packer.add(make_doc("captions", ["i", 8], "c2"), (0, 0, 1))
    text = make_doc("text", [18], "t")  # 20 tokens: one piece
    packer.add(text, (1, 0, 5))
    assert [len(p) for p in packer.next_sequence()] == [16, 4]
    assert [len(p) for p in packer.next_sequence()] == [16, 4]
    (rest,) = packer.buffer
    assert rest.ref == (1, 0, 5, 0, 8) and not rest.first
    assert rest.doc.input_ids == slice_document(text, rest.ref[-1], 20).input_ids


def test_statistics_add_up_and_survive_a_round_trip() -> None:
    packer = Packer(seq_len=32, max_images=2, min_fill=4)
    packer.add(make_doc("interleaved", [2, "i", 2, "i", 2, "i", 2], "x"), (0, 0, 0))
    packer.add(make_doc("captions", ["i", 40], "c"), (1, 0, 0))  # truncated
    packer.add(make_doc("text", [50], "t"), (2, 0, 0))
    while packer.buffer:
        packer.next_sequence()
    s = packer.stats
    assert s.images == 3 and s.images_dropped == 1 and s.truncated == 1
    assert s.image_tokens == Q * s.images
    assert sum(s.tokens_per_source.values()) == s.tokens
    assert s.tokens_per_source["text"] == 52
    d = s.to_dict()
    assert d["images_dropped_fraction"] == pytest.approx(1 / 4)
    assert d["tokens_per_image"] == Q
    assert PackStats.from_dict(d) == s


def test_text_only_packing_has_no_image_cap_padding() -> None:
    packer = Packer(seq_len=64, max_images=0)
    packer.add(make_doc("text", [20], "t"))
    packer.next_sequence()
    assert packer.stats.padding == 42 and packer.stats.padding_image_cap == 0


def test_positions_restart_at_every_document_padding_included() -> None:
    packer = Packer(seq_len=24, max_images=4)
    packer.add(make_doc("text", [4], "a"))
    packer.add(make_doc("captions", ["i", 3], "b"))
    batch = collate([packer.next_sequence()], 24, pad_id=0)
    docs, pos = batch.document_ids[0].tolist(), batch.position_ids[0].tolist()
    expected = [t - docs.index(d) for t, d in enumerate(docs)]
    assert docs[-1] == 2 and pos == expected
