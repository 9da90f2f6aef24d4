"""Synthetic packed batches as plain tensors (torch only: no tokenizer, no data stack).

Used by the scaling benchmark and by the GPU script, which must run where only torch is
installed. A row holds documents of `doc_len` tokens (the last takes the remainder); the images
are spread over the documents, each image's `image_tokens` slots starting one token into its
document; labels follow the Batch contract (target = next token of the same document, -100 on
image slots and at document ends).
"""

from __future__ import annotations

import torch

IGNORE = -100


def packed_batch(
    rows: int,
    seq_len: int,
    images_per_row: int,
    image_tokens: int,
    image_size: int,
    vocab_size: int,
    image_token_id: int,
    doc_len: int = 512,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """input_ids, labels, position_ids, document_ids (rows, seq_len) and pixel_values
    (rows * images_per_row, 3, image_size, image_size), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=g)
    ids[ids == image_token_id] = (image_token_id + 1) % vocab_size
    doc = torch.zeros(rows, seq_len, dtype=torch.long)
    pos = torch.zeros(rows, seq_len, dtype=torch.long)
    n_docs = max(1, seq_len // doc_len)
    bounds = [round(i * seq_len / n_docs) for i in range(n_docs + 1)]
    for r in range(rows):
        for d in range(n_docs):
            a, b = bounds[d], bounds[d + 1]
            doc[r, a:b] = d
            pos[r, a:b] = torch.arange(b - a)
            k = images_per_row // n_docs + (d < images_per_row % n_docs)
            if 1 + k * image_tokens > b - a:
                raise ValueError(
                    f"{k} images of {image_tokens} tokens do not fit a {b - a}-token document; "
                    "raise doc_len or lower images_per_row"
                )
            for j in range(k):
                s = a + 1 + j * image_tokens
                ids[r, s : s + image_tokens] = image_token_id
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    same_doc = doc[:, :-1] == doc[:, 1:]
    labels[:, :-1][~same_doc | (ids[:, 1:] == image_token_id)] = IGNORE
    n_images = rows * images_per_row
    pixels = torch.randn(n_images, 3, image_size, image_size, generator=g) if n_images else None
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "document_ids": doc,
        "pixel_values": pixels,
    }


def to_device(batch: dict, device, dtype: torch.dtype | None = None) -> dict:
    out = {}
    for k, v in batch.items():
        if v is None:
            out[k] = None
        elif v.is_floating_point() and dtype is not None:
            out[k] = v.to(device, dtype)
        else:
            out[k] = v.to(device)
    return out
