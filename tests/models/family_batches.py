"""Batches the model-family tests share."""

from __future__ import annotations

import torch

from mm1.batch import IGNORE_INDEX


def two_packed_rows(image_id: int, q: int, image_size: int) -> dict[str, torch.Tensor]:
    """Two packed rows with 4 images of `q` slots (`image_id`): row 0 holds a caption-first
    document (<img>-less: its last text token predicts the first slot) and an image-first one
    whose image opens the document (its first slot has no predecessor); row 1 one document with
    two images. Labels are the next tokens, none on or of an image slot."""
    s = [image_id] * q
    row0 = [5, 6, 7, *s, 2, *s, 8, 9, 2]
    doc0 = [1] * 8 + [2] * (q + 3)
    row1 = [5, *s, 10, 11, *s, 12, 2]
    row1 += [0] * (len(row0) - len(row1))
    doc1 = [1] * (2 * q + 5) + [0] * (len(row0) - 2 * q - 5)
    ids = torch.tensor([row0, row1])
    labels = torch.roll(ids, -1, 1)
    labels[(labels == image_id) | (ids == image_id)] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    pixels = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    return {
        "input_ids": ids,
        "labels": labels,
        "document_ids": torch.tensor([doc0, doc1]),
        "pixel_values": pixels,
    }
