"""The MM1 model: image encoder -> connector -> image tokens written into the decoder's input."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mm1.batch import IGNORE_INDEX
from mm1.config import ModelConfig, resolve_components
from mm1.models.connectors import build_connector
from mm1.models.decoder import Decoder
from mm1.models.layers import init_weights
from mm1.models.vision import VisionTransformer


@dataclass
class MM1Output:
    logits: torch.Tensor | None  # (B, T, vocab); None for a loss-only call (see `MM1.forward`)
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # summed cross-entropy over the label tokens
    num_label_tokens: int = 0
    token_loss: torch.Tensor | None = None  # (B, T) cross-entropy per position, 0 where unlabelled
    # The blocks' auxiliary losses by name (e.g. a router's load balance), unweighted and
    # normalised like `loss` (see `MM1.forward`); empty for a dense model.
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MM1(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = resolve_components(cfg)
        self.vision = VisionTransformer(cfg.vision)
        self.connector = build_connector(
            cfg.connector, cfg.vision.width, cfg.vision.grid, cfg.decoder.dim, cfg.init_std
        )
        self.decoder = Decoder(cfg.decoder, cfg.init_std)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight in place: used after `to_empty` when the model was built on
        the meta device and sharded before any weight existed."""
        self.vision.reset_parameters()
        init_weights(self.connector, self.cfg.init_std)
        if hasattr(self.connector, "reset_parameters"):
            self.connector.reset_parameters()
        self.decoder.init_weights()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the non-persistent buffers, which no checkpoint holds, where the weights are:
        after `to_empty`, or after a meta-built model got its weights by assignment."""
        self.decoder.init_buffers()

    @property
    def image_token_id(self) -> int:
        return self.cfg.resolved_image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.connector.num_tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, Q, D_llm)."""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every image's Q slots replaced by its image tokens."""
        embeds = self.decoder.embed(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        q = self.num_image_tokens
        if n_slots != n_images * q:
            raise ValueError(
                f"input_ids hold {n_slots} image slots but {n_images} images x {q} tokens = "
                f"{n_images * q} image tokens were given"
            )
        if n_images:
            feats = self.image_features(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots[..., None], feats.reshape(-1, feats.shape[-1]))
        elif (self.training and torch.is_grad_enabled()) or _multi_rank():
            # A text-only batch still runs the encoder once (on a blank image, with zero
            # weight), so every rank calls the same collectives: DDP's gradient buckets in
            # training, FSDP's parameter all-gathers in every forward (validation included).
            size = self.cfg.vision.image_size
            blank = embeds.new_zeros(1, 3, size, size)
            embeds = embeds + 0.0 * self.image_features(blank).sum().to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_label_tokens: int | None = None,
        return_logits: bool | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> MM1Output:
        """Logits, and with `labels` the cross-entropy over the label tokens.

        The loss is normalised by `num_label_tokens` when given (the count over the whole step:
        every micro-batch and rank, so accumulation and world size leave it unchanged), else by
        this batch's own count. With labels, the output head runs only on the labelled
        positions (image slots and prompts carry no target), and the full (B, T, vocab) logits
        are returned only when `return_logits=True`: at a real vocabulary they are the largest
        activation of the step.

        Auxiliary losses (means over this batch, summed over blocks) are normalised like the
        cross-entropy: scaled by this batch's share of the step's label tokens, so their sum
        over micro-batches and ranks is the label-weighted mean, whatever the accumulation.
        `token_mask` (B, T) marks the tokens a MoE router's statistics count (the non-padding
        ones, image slots included); None counts every token.
        """
        embeds = self.embed(input_ids, pixel_values)
        if return_logits is None:
            return_logits = labels is None
        aux: dict[str, torch.Tensor] = {}
        hidden = self.decoder(
            inputs_embeds=embeds,
            position_ids=position_ids,
            document_ids=document_ids,
            return_hidden=True,
            aux_losses=aux,
            token_mask=token_mask,
        )
        logits = self.decoder.lm_head(hidden) if return_logits else None
        if labels is None:
            return MM1Output(logits, aux_losses=aux)
        labelled = labels != IGNORE_INDEX
        if logits is not None:
            label_logits = logits[labelled]
        else:
            label_logits = self.decoder.lm_head(hidden[labelled])
        per_label = F.cross_entropy(label_logits.float(), labels[labelled], reduction="none")
        token_loss = per_label.new_zeros(labels.shape).masked_scatter(labelled, per_label)
        loss_sum = per_label.sum()
        n = per_label.numel()
        denom = num_label_tokens if num_label_tokens is not None else n
        share = n / max(denom, 1)
        aux = {k: v * share for k, v in aux.items()}
        return MM1Output(logits, loss_sum / max(denom, 1), loss_sum, n, token_loss, aux)
