"""The batch: the one contract between the data side and the models (see docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A packed batch of plain tensors.

    input_ids     (B, T) long: text tokens; each image's Q slots hold the image placeholder id.
    labels        (B, T) long: target of position t = token t+1 of the same document; -100 on
                  image slots, padding, document ends and (SFT) non-assistant tokens.
    position_ids  (B, T) long: restart at 0 for every packed document.
    document_ids  (B, T) long: attention stays causal inside a document; padding is its own;
                  a document's tokens are contiguous in its row (a run of one id).
    pixel_values  (C, 3, H, W): every crop of every image of the batch in slot order (one crop
                  per image in the `single` layout), or None.
    image_crops   (N,) long: each image's number of crops (rows of pixel_values); optional
                  (None: one per image).
    image_sizes   (N, 2) long: each image's original (height, width), which the anyres layout
                  needs to unpad its grid; optional.
    kind_ids      (B, T) long: the kind of each token's document (its index in
                  `config.SOURCE_KINDS`: captions, interleaved, text, sft; -1 for padding), for
                  per-kind losses; optional.
    dataset_ids   (B, T) long: the source (dataset) each token came from (its index in
                  `data.sources`; -1 for padding), for per-dataset losses; optional.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    kind_ids: torch.Tensor | None = None
    dataset_ids: torch.Tensor | None = None
    image_crops: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(
            **{
                k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                for k, v in values.items()
            }
        )

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of the model's forward."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "document_ids": self.document_ids,
            "pixel_values": self.pixel_values,
            "image_crops": self.image_crops,
            "image_sizes": self.image_sizes,
        }

    @property
    def num_images(self) -> int:
        """Images, not crops: a tiled image is several rows of pixel_values."""
        if self.image_crops is not None:
            return len(self.image_crops)
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    @property
    def num_real_tokens(self) -> int:
        """Tokens that are not padding: where `kind_ids` says so (-1 is padding), else all."""
        if self.kind_ids is None:
            return self.input_ids.numel()
        return int((self.kind_ids >= 0).sum())

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())
