"""How many images a trained model ever saw in one attention context (docs/ablations.md, "The
demo's few-shot curve").

`python -m benchmarks.context_images RUN_DIR [--world DIR] [--sequences N] [KEY=VALUE ...]`
packs the first N training sequences of a run exactly as its loader does (same config, world, tokenizer, seed)
and counts, per attention context (one packed piece: `document_ids` keep attention inside it),
its tokens, its images, its image->text pairs (an image followed by text before the next image
or the end), the pairs in the few-shot caption format (`<image>Output:`), and the
`<|endofchunk|>` tokens, by source kind. It prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mm1.data.tokenizer import TokenizedDocument


@dataclass(frozen=True)
class ContextCounts:
    """What one attention context holds."""

    kind: str
    tokens: int
    images: int
    pairs: int  # images followed by at least one text token before the next image / the end
    output_pairs: int  # of those, text starting with "Output:" (the caption prompt's format)
    endofchunk: int


def context_counts(
    doc: TokenizedDocument, decode: Any, endofchunk_id: int | None, text_tokens: int = 4
) -> ContextCounts:
    """Counts for one packed piece; `decode(ids)` reads the first `text_tokens` tokens after
    each image (enough for "Output:")."""
    pairs = output_pairs = 0
    spans = doc.image_spans
    for i, (_, end) in enumerate(spans):
        nxt = spans[i + 1][0] if i + 1 < len(spans) else len(doc.input_ids)
        if nxt > end:
            pairs += 1
            head = decode(doc.input_ids[end : min(nxt, end + text_tokens)])
            output_pairs += head.lstrip().startswith("Output:")
    eoc = sum(t == endofchunk_id for t in doc.input_ids) if endofchunk_id is not None else 0
    return ContextCounts(doc.kind, len(doc.input_ids), len(spans), pairs, output_pairs, eoc)


def summarize(counts: Iterable[ContextCounts]) -> dict[str, Any]:
    """Per kind (and "all"): contexts, histograms of images and pairs per context, the
    longest context, and the totals of "Output:" pairs and `<|endofchunk|>` tokens."""
    groups: dict[str, list[ContextCounts]] = {}
    for c in counts:
        groups.setdefault(c.kind, []).append(c)
        groups.setdefault("all", []).append(c)
    out: dict[str, Any] = {}
    for kind, cs in sorted(groups.items()):
        with_images = [c for c in cs if c.images]
        out[kind] = {
            "contexts": len(cs),
            "images_hist": dict(sorted(Counter(c.images for c in cs).items())),
            "pairs_hist": dict(sorted(Counter(c.pairs for c in cs).items())),
            "max_images": max(c.images for c in cs),
            "max_pairs": max(c.pairs for c in cs),
            "mean_images_if_any": (
                sum(c.images for c in with_images) / len(with_images) if with_images else 0.0
            ),
            "max_tokens": max(c.tokens for c in cs),
            "tokens_quantiles": {
                q: sorted(c.tokens for c in cs)[int(q * (len(cs) - 1))] for q in (0.5, 0.9, 0.99)
            },
            "mean_tokens": sum(c.tokens for c in cs) / len(cs),
            "output_pairs": sum(c.output_pairs for c in cs),
            "contexts_with_output_pairs_ge2": sum(c.output_pairs >= 2 for c in cs),
            "endofchunk_tokens": sum(c.endofchunk for c in cs),
        }
    return out


def packed_contexts(
    run: Path, world: Path | None, sequences: int, overrides: Sequence[str] = ()
) -> list[ContextCounts]:
    """The first `sequences` packed training rows of a run (its config changed by
    `overrides`, e.g. data.seq_len=512), one `ContextCounts` per piece."""
    from mm1.config.loading import load_config
    from mm1.data.loader import LoaderSettings, PackedDataset
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.tokenizer import ENDOFCHUNK_TOKEN
    from mm1.data.world import prepare_data

    changes = [f"data.world={world}"] if world is not None else []
    cfg = load_config(run / "config.yaml", [*changes, *overrides])
    data = prepare_data(cfg.data, cfg.model, init=cfg.train.init)
    fmt = PromptFormat.from_config(cfg.data, cfg.model.num_image_tokens, cfg.model)
    settings = replace(LoaderSettings.from_config(cfg.data, data.sources, fmt), micro_batch_size=1)
    ds = PackedDataset(settings, data.tokenizer, processor=None)  # type: ignore[arg-type]
    ds._build()
    assert ds._packer is not None
    tok = data.tokenizer
    eoc = tok.token_to_id(ENDOFCHUNK_TOKEN)
    out: list[ContextCounts] = []
    for _ in range(sequences):
        ds._fill()
        for piece in ds._packer.next_sequence():
            out.append(context_counts(piece.doc, tok.decode, eoc))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--world", type=Path, default=None, help="the run's world, if moved")
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.seq_len=512")
    args = ap.parse_intermixed_args()
    stats = summarize(packed_contexts(args.run, args.world, args.sequences, args.overrides))
    print(json.dumps({"sequences": args.sequences, "by_kind": stats}, indent=1))


if __name__ == "__main__":
    main()
