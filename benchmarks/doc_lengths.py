"""The committed document-length distribution of the GPU side by side (`gpu_llava.py`).

`python -m benchmarks.doc_lengths` draws the first documents of the default synthetic world's
45/45/10 training mixture (captions / interleaved / text), tokenizes them as training does, and
writes each document's layout to `benchmarks/doc_lengths.json`: its kind and a list of segments,
an int for a run of text tokens (BOS, EOS and words) and "I" for one image. The GPU machine has
no tokenizer files and no world; `documents()` rebuilds the same documents there as
`TokenizedDocument`s with random token ids and any number of slots per image, so every variant
trains on the same lengths, images and targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mm1.data.tokenizer import TokenizedDocument

PATH = Path(__file__).resolve().parent / "doc_lengths.json"
IMAGE = "I"


def layout(doc: TokenizedDocument) -> list[int | str]:
    """Text runs and images of a document tokenized with one slot per image."""
    out: list[int | str] = []
    t = 0
    for start, end in doc.image_spans:
        if end - start != 1:
            raise ValueError("tokenize with one slot per image and no image boundaries")
        if start > t:
            out.append(start - t)
        out.append(IMAGE)
        t = end
    if len(doc.input_ids) > t:
        out.append(len(doc.input_ids) - t)
    return out


def write(num_docs: int, path: Path = PATH) -> Path:
    from benchmarks.common import ensure_world
    from benchmarks.train_step import document_stream
    from mm1.data.tokenizer import Tokenizer

    world = ensure_world(64)
    tok = Tokenizer.from_file(world.tokenizer_path)
    docs = document_stream(world, tok, 1, num_docs)
    payload = {
        "about": "document layouts of the default world's training mixture (45/45/10), "
        "first documents of stream slot 0, seed 0; int = text tokens, 'I' = one image",
        "documents": [{"kind": d.kind, "layout": layout(d)} for d in docs],
    }
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    return path


def documents(
    num_image_tokens: int,
    vocab_size: int,
    image_token_id: int,
    limit: int | None = None,
    seed: int = 0,
    path: Path = PATH,
) -> list[TokenizedDocument]:
    """The committed documents with random text ids and `num_image_tokens` slots per image.

    Targets as `tokenize_document` sets them: text tokens are targets except the first (BOS),
    image slots never. `images` holds each image's index in the stream (pixels are random).
    """
    records = json.loads(path.read_text())["documents"][:limit]
    g = torch.Generator().manual_seed(seed)
    out, image_index = [], 0
    for k, rec in enumerate(records):
        ids: list[int] = []
        mask: list[bool] = []
        spans, images = [], []
        for seg in rec["layout"]:
            if seg == IMAGE:
                spans.append((len(ids), len(ids) + num_image_tokens))
                ids += [image_token_id] * num_image_tokens
                mask += [False] * num_image_tokens
                images.append(image_index)
                image_index += 1
            else:
                text = torch.randint(0, vocab_size - 1, (int(seg),), generator=g)
                text[text >= image_token_id] += 1  # never the image id
                ids += text.tolist()
                mask += [len(mask) + i > 0 for i in range(int(seg))]
        out.append(TokenizedDocument(ids, mask, images, rec["kind"], f"doc{k}", spans))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-docs", type=int, default=2000)
    args = ap.parse_args()
    print(f"wrote {write(args.num_docs)}")


if __name__ == "__main__":
    main()
