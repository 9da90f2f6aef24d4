"""Multimodal LLMs with image slots in the decoder's input (`MLLM`), and the MM1 model:
image encoder -> connector -> image tokens written into those slots."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mm1.batch import IGNORE_INDEX
from mm1.config import LOGIT_Z, ModelConfig, resolve_components
from mm1.models.connectors import build_connector
from mm1.models.decoder import Decoder
from mm1.models.layers import init_weights
from mm1.models.vision import VisionTransformer
from mm1.tiling import anyres_grid, anyres_tokens, canvas_candidates, unpadded_rows_cols


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


def predicted_slots(slots: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool: the image slots a family's image loss predicts, those whose previous
    position lies in the same document (the position that predicts it)."""
    out = torch.zeros_like(slots)
    same = (
        document_ids[:, 1:] == document_ids[:, :-1]
        if document_ids is not None
        else torch.ones_like(slots[:, 1:])
    )
    out[:, 1:] = slots[:, 1:] & same
    return out


def predicting_positions(predicted: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the position before each slot of `predicted` (whose output predicts it)."""
    out = torch.zeros_like(predicted)
    out[:, :-1] = predicted[:, 1:]
    return out


class MLLM(nn.Module, ABC):
    """A decoder LLM whose image slots in `input_ids` are filled with image tokens: what every
    `model.family` shares (embedding, the loss, buffers). A family says how pixels become image
    tokens: `num_image_tokens`, `image_tokens`, and the `vision` and `connector` parts that
    `image_features` runs (`train.train_vision` / `train_connector` freeze them)."""

    vision: nn.Module
    connector: nn.Module
    decoder: Decoder
    image_newline: nn.Parameter | None  # a learned token some layouts write after image rows

    def __init__(self, cfg: ModelConfig) -> None:
        # The parts are built by each family, image side first: the order fixes the random
        # initialisation a seed gives and the checkpoint's key order.
        super().__init__()
        self.cfg = resolve_components(cfg)

    @abstractmethod
    def init_weights(self) -> None:
        """Initialise every weight in place (under `torch.no_grad`): used after `to_empty` when
        the model was built on the meta device and sharded before any weight existed."""

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the non-persistent buffers, which no checkpoint holds, where the weights are:
        after `to_empty`, or after a meta-built model got its weights by assignment."""
        self.decoder.init_buffers()

    @property
    def image_token_id(self) -> int:
        return self.cfg.resolved_image_token_id

    @property
    @abstractmethod
    def num_image_tokens(self) -> int:
        """Q, the tokens of one crop (one encoder input)."""

    @abstractmethod
    def image_tokens(
        self,
        pixel_values: torch.Tensor,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All images' tokens in slot order, (sum of tokens, D_llm)."""

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) crops -> (N, Q, D_llm), the encoder and connector run on at most
        `model.image_layout.encoder_chunk` crops at a time (0: all at once).

        With several ranks, every rank runs the encoder as many times as the rank with the
        most chunks (extra calls on a blank crop, with zero weight): FSDP all-gathers the
        encoder's weights at each call, so ranks holding different numbers of crops would
        otherwise issue different collectives and hang."""
        return self.chunked(pixel_values, lambda crops: self.connector(self.vision(crops)))

    def chunked(
        self, pixel_values: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """`encode` (crops -> one tensor per crop) on the crops, chunked as `image_features`
        runs the encoder and connector."""
        chunk = self.cfg.image_layout.encoder_chunk
        if not chunk:
            return encode(pixel_values)
        parts = pixel_values.split(chunk)
        extra = 0
        if _multi_rank():  # agreed before any call: the calls' collectives must line up
            calls = torch.tensor([len(parts)], device=pixel_values.device)
            dist.all_reduce(calls, op=dist.ReduceOp.MAX)
            extra = int(calls) - len(parts)
        pieces = [encode(part) for part in parts]
        blank = pixel_values.new_zeros(1, *pixel_values.shape[1:])
        for _ in range(extra):
            dummy = encode(blank).sum()
            pieces[-1] = pieces[-1] + 0.0 * dummy.to(pieces[-1].dtype)
        return torch.cat(pieces)

    def image_tokens_and_targets(
        self,
        pixel_values: torch.Tensor,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`image_tokens`, and per image slot what a family's image loss regresses there
        (None: the family has no image loss; `image_losses`)."""
        return self.image_tokens(pixel_values, image_crops, image_sizes), None

    def image_losses(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        document_ids: torch.Tensor | None,
        targets: torch.Tensor | None,
        num_images: int | None,
    ) -> dict[str, torch.Tensor]:
        """A family's losses on the image slots, by name (added to the auxiliary losses), from
        the decoder's final hidden states and `image_tokens_and_targets`' targets (None when
        the batch has no image); `num_images` is the step's image count, the normaliser that
        makes them independent of accumulation and world size. None here."""
        return {}

    def text_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (..., vocab) over the tokens text is written with: all of them here; a family
        whose vocabulary also holds image codes (chameleon) leaves those out."""
        return logits

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every image's slots replaced by its image tokens.

        `pixel_values` holds every crop of every image in slot order; `image_crops` (N,) and
        `image_sizes` (N, 2: height, width) say which crops are whose and are needed only by
        the anyres layout (its crop count, when absent, follows from the size)."""
        return self._embed(input_ids, pixel_values, image_crops, image_sizes)[0]

    def _embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`embed`, and the image loss's targets (`image_tokens_and_targets`)."""
        embeds = self.decoder.embed(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        n_crops = 0 if pixel_values is None else pixel_values.shape[0]
        targets = None
        if n_crops:
            # On the model's device, in the image side's dtype (a model loaded in bf16; a no-op
            # in training, whose weights are fp32 under autocast or cast with the inputs by
            # FSDP): its first weight's, as every family builds its image side first.
            dtype = next(self.parameters()).dtype
            pixel_values = pixel_values.to(device=embeds.device, dtype=dtype)
            feats, targets = self.image_tokens_and_targets(pixel_values, image_crops, image_sizes)
            feats = feats.to(embeds.dtype)
            if n_slots != feats.shape[0]:
                raise ValueError(
                    f"input_ids hold {n_slots} image slots but the {n_crops} crops given make "
                    f"{feats.shape[0]} image tokens ({self.cfg.image_layout.type} layout, "
                    f"{self.num_image_tokens} per crop)"
                )
            embeds = embeds.masked_scatter(slots[..., None], feats)
        elif n_slots:
            raise ValueError(f"input_ids hold {n_slots} image slots but no image was given")
        elif (self.training and torch.is_grad_enabled()) or _multi_rank():
            # A text-only batch still runs the encoder once (on a blank image, with zero
            # weight), so every rank calls the same collectives: DDP's gradient buckets in
            # training, FSDP's parameter all-gathers in every forward (validation included).
            size = self.cfg.vision.image_size
            blank = embeds.new_zeros(1, 3, size, size)
            unused = self.image_features(blank).sum()
            if self.image_newline is not None:
                unused = unused + self.image_newline.sum()
            embeds = embeds + 0.0 * unused.to(embeds.dtype)
        return embeds, targets

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_label_tokens: int | None = None,
        return_logits: bool | None = None,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        z_loss: bool = False,
        num_images: int | None = None,
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
        ones, image slots included); None counts every token. `z_loss` adds the output z-loss
        (`logit_z`: log(Z)^2 of the head's softmax per label token) to the auxiliary losses,
        summed and normalised as the cross-entropy is. A family's image losses
        (`image_losses`) join them, normalised by `num_images`, the step's images (None: this
        batch's).
        """
        embeds, targets = self._embed(input_ids, pixel_values, image_crops, image_sizes)
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
        log_z = None
        if z_loss:  # one log-softmax for both: the head's activations are not kept twice
            logp = F.log_softmax(label_logits.float(), dim=-1)
            per_label = -logp.gather(-1, labels[labelled][:, None]).squeeze(-1)
            log_z = label_logits[:, 0].float() - logp[:, 0]  # log-softmax = logit - log Z
        else:
            per_label = F.cross_entropy(label_logits.float(), labels[labelled], reduction="none")
        token_loss = per_label.new_zeros(labels.shape).masked_scatter(labelled, per_label)
        loss_sum = per_label.sum()
        n = per_label.numel()
        denom = num_label_tokens if num_label_tokens is not None else n
        share = n / max(denom, 1)
        aux = {k: v * share for k, v in aux.items()}
        if log_z is not None:
            aux[LOGIT_Z] = log_z.square().sum() / max(denom, 1)
        aux.update(self.image_losses(hidden, input_ids, document_ids, targets, num_images))
        return MM1Output(logits, loss_sum / max(denom, 1), loss_sum, n, token_loss, aux)


class MM1(MLLM):
    """MM1: image encoder (a ViT) -> connector -> image tokens written into the decoder's input."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.vision = VisionTransformer(cfg.vision)
        self.connector = build_connector(
            cfg.connector, cfg.vision.width, cfg.vision.grid, cfg.decoder.dim, cfg.init_std
        )
        self.decoder = Decoder(cfg.decoder, cfg.init_std)
        # anyres: the learned token after each row of an image's tile grid (LLaVA-NeXT's).
        self.image_newline = (
            nn.Parameter(torch.empty(cfg.decoder.dim))
            if cfg.image_layout.type == "anyres"
            else None
        )
        if self.image_newline is not None:
            self._reset_newline()

    @torch.no_grad()
    def _reset_newline(self) -> None:
        # LLaVA-NeXT's initialisation: normal with std 1 / sqrt(hidden size).
        nn.init.normal_(self.image_newline, std=1 / math.sqrt(self.cfg.decoder.dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        self.vision.reset_parameters()
        init_weights(self.connector, self.cfg.init_std)
        if hasattr(self.connector, "reset_parameters"):
            self.connector.reset_parameters()
        self.decoder.init_weights()
        if self.image_newline is not None:
            self._reset_newline()

    @property
    def num_image_tokens(self) -> int:
        return self.connector.num_tokens

    def image_token_counts(
        self, image_crops: torch.Tensor, image_sizes: torch.Tensor | None
    ) -> list[int]:
        """Image tokens of each image, from its crop count and (anyres) original size; the
        data side's `PromptFormat.slots` gives the same numbers (tested)."""
        q = self.num_image_tokens
        if self.cfg.image_layout.type != "anyres":
            return [int(c) * q for c in image_crops.tolist()]
        if image_sizes is None:
            raise ValueError("the anyres layout needs image_sizes (height, width) per image")
        side, crop = math.isqrt(q), self.cfg.vision.image_size
        canvases = canvas_candidates(
            crop, self.cfg.image_layout.pinpoints, self.cfg.image_layout.grid
        )
        out = []
        for crops, (h, w) in zip(image_crops.tolist(), image_sizes.tolist()):
            if crops == 1:  # the single form (few-shot context images)
                out.append(q)
                continue
            rows, cols = anyres_grid((w, h), crop, canvases)
            if crops != 1 + rows * cols:
                raise ValueError(
                    f"an image of {w}x{h} px has {crops} crops, but anyres cuts it into "
                    f"1 + {rows}x{cols}"
                )
            out.append(anyres_tokens((w, h), rows, cols, side))
        return out

    def _anyres_tokens(self, feats: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One image's (crops, Q, D) features -> its tokens: the base crop's, then the tiles'
        as one grid, padding removed, a newline after each row (LLaVA-NeXT's packing)."""
        base, tiles = feats[0], feats[1:]
        side, crop = math.isqrt(feats.shape[1]), self.cfg.vision.image_size
        canvases = canvas_candidates(
            crop, self.cfg.image_layout.pinpoints, self.cfg.image_layout.grid
        )
        rows, cols = anyres_grid((width, height), crop, canvases)
        d = feats.shape[-1]
        grid = tiles.reshape(rows, cols, side, side, d).permute(4, 0, 2, 1, 3)
        grid = grid.reshape(d, rows * side, cols * side)
        r0, r1, c0, c1 = unpadded_rows_cols((width, height), rows * side, cols * side)
        grid = grid[:, r0:r1, c0:c1]
        newline = self.image_newline[:, None, None].expand(d, r1 - r0, 1).to(grid.dtype)
        grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat([base, grid], dim=0)

    def image_tokens(
        self,
        pixel_values: torch.Tensor,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All images' tokens in slot order, (sum of tokens, D_llm). Each crop gives Q tokens
        in order (single, mm1, dynamic); an anyres image's crops are assembled into its grid."""
        feats = self.image_features(pixel_values)
        if self.cfg.image_layout.type != "anyres":
            return feats.reshape(-1, feats.shape[-1])
        if image_crops is None:
            if image_sizes is None:
                raise ValueError("the anyres layout needs image_sizes (height, width) per image")
            image_crops = self._anyres_crops(image_sizes)
        if int(image_crops.sum()) != feats.shape[0]:
            raise ValueError(
                f"image_crops add up to {int(image_crops.sum())} crops but "
                f"{feats.shape[0]} were given"
            )
        out, used_newline = [], False
        sizes = image_sizes.tolist() if image_sizes is not None else [None] * len(image_crops)
        for image, size in zip(feats.split(image_crops.tolist()), sizes):
            if image.shape[0] == 1:
                out.append(image[0])
            elif size is None:  # the grid's layout comes from the image's size
                raise ValueError("the anyres layout needs image_sizes (height, width) per image")
            else:
                out.append(self._anyres_tokens(image, *size))
                used_newline = True
        tokens = torch.cat(out)
        if not used_newline:  # every parameter takes part (DDP / FSDP gradients)
            tokens = tokens + 0.0 * self.image_newline.sum().to(tokens.dtype)
        return tokens

    def _anyres_crops(self, image_sizes: torch.Tensor) -> torch.Tensor:
        crop = self.cfg.vision.image_size
        canvases = canvas_candidates(
            crop, self.cfg.image_layout.pinpoints, self.cfg.image_layout.grid
        )
        grids = [anyres_grid((w, h), crop, canvases) for h, w in image_sizes.tolist()]
        return torch.tensor([1 + r * c for r, c in grids], dtype=torch.long)
