"""benchmarks/context_images.py: what one attention context of a packed training row holds."""

from __future__ import annotations

from benchmarks.context_images import ContextCounts, context_counts, summarize

from mm1.data.tokenizer import TokenizedDocument

WORDS = {1: "Output:", 2: "a", 3: "red", 9: "<eoc>"}


def _decode(ids: list[int]) -> str:
    return "".join(WORDS.get(i, "x") for i in ids)


def _doc(ids: list[int], spans: list[tuple[int, int]], kind: str = "interleaved"):
    return TokenizedDocument(
        input_ids=ids,
        target_mask=[True] * len(ids),
        images=[object()] * len(spans),
        kind=kind,
        id="d",
        image_spans=spans,
    )


def test_pairs_need_text_after_the_image() -> None:
    # image, "Output:a red", image, image (back to back), "a", image at the very end
    ids = [0, 7, 7, 1, 2, 3, 7, 7, 7, 7, 2, 9, 7, 7]
    doc = _doc(ids, [(1, 3), (6, 8), (8, 10), (12, 14)])
    c = context_counts(doc, _decode, endofchunk_id=9)
    assert (c.tokens, c.images, c.pairs, c.output_pairs, c.endofchunk) == (14, 4, 2, 1, 1)


def test_summary_histograms_by_kind() -> None:
    cs = [
        ContextCounts("captions", 20, 1, 1, 0, 0),
        ContextCounts("interleaved", 200, 6, 6, 2, 0),
        ContextCounts("interleaved", 40, 0, 0, 0, 0),
    ]
    s = summarize(cs)
    assert s["interleaved"]["images_hist"] == {0: 1, 6: 1}
    assert s["all"]["max_images"] == 6 and s["all"]["max_tokens"] == 200
    assert s["interleaved"]["contexts_with_output_pairs_ge2"] == 1
    assert s["captions"]["mean_images_if_any"] == 1.0
