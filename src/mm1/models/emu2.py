"""An Emu2-style model (`model.family: emu2`; Sun et al., "Generative Multimodal Models are
In-Context Learners", 2023): continuous image features in, text and continuous image features
out.

In, it is MM1 with the `avgpool` connector: the image encoder's patch grid average-pooled to
sqrt(Q) x sqrt(Q) features (Emu2: 8 x 8 = 64) and projected into the decoder. Out, beside the
text head, a second head (`regress`: decoder width -> encoder width) predicts at each position
whose next token is an image slot that slot's pooled feature, the features Emu2's visual decoder
(a diffusion model) turns into pixels. The loss, `model.regression_loss` (the talk's l1, or mse;
each a mean over the channels), is the auxiliary loss `image_regression`, weighted by
`train.aux_loss_weights.image_regression` beside the text's cross-entropy. With
`data.image_boundaries` an image's `<img>` predicts its first feature, as Emu2's [IMG] does;
without, the token before the image (in an image-first caption pair the BOS, which has nothing
to condition on: the mean image is its best guess; no slot is regressed from another document).

Generating an image is autoregression in feature space (`generate_image_features`): each
predicted feature, projected as an encoded one is, is the next input. mm1 has no pixel decoder;
`mm1.eval.image_generation` scores generated features by retrieving the image they describe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mm1.config import IMAGE_REGRESSION, ConfigError, ModelConfig
from mm1.models.family import MM1_FAMILY, ModelFamily, mm1_hf
from mm1.models.generation import left_pad
from mm1.models.kv_cache import KVCache
from mm1.models.layers import init_weights
from mm1.models.mllm import MM1, predicted_slots, predicting_positions
from mm1.registry import FAMILIES

CONNECTOR = "avgpool"  # Emu2's: the pooled features are both the input and the target


class Emu2(MM1):
    """MM1 with the avgpool connector, and a head that regresses the next image feature."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.regress = nn.Linear(self.cfg.decoder.dim, self.cfg.vision.width)
        init_weights(self.regress, self.cfg.init_std)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        init_weights(self.regress, self.cfg.init_std)

    def _tokens_and_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """Each crop's image tokens and, after them on the channel axis, the pooled features
        they were projected from (the regression's targets), both in fp32: one tensor, so the
        encoder runs once, chunked as ever (`MLLM.chunked`)."""
        pooled = self.connector.pool(self.vision(pixels))
        tokens = self.connector.proj(pooled)
        return torch.cat([tokens.float(), pooled.detach().float()], dim=-1)

    def image_tokens_and_targets(
        self,
        pixel_values: torch.Tensor,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tokens, and the pooled features they come from, fp32 and detached: a
        target, not a path for gradients."""
        both = self.chunked(pixel_values, self._tokens_and_pooled)
        tokens, targets = both.split([self.cfg.decoder.dim, self.cfg.vision.width], dim=-1)
        return tokens.reshape(-1, tokens.shape[-1]), targets.reshape(-1, targets.shape[-1]).detach()

    def image_losses(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        document_ids: torch.Tensor | None,
        targets: torch.Tensor | None,
        num_images: int | None,
    ) -> dict[str, torch.Tensor]:
        """`image_regression`: the per-slot loss summed over the regressed slots and divided by
        the step's image slots (`num_images` x Q), so micro-batches and ranks add up to the
        step's mean whatever the accumulation."""
        if targets is None:  # no image in this batch: zero, every weight in the graph (FSDP)
            zero = sum(p.sum() for p in self.regress.parameters())
            return {IMAGE_REGRESSION: 0.0 * zero.float()}
        q = self.num_image_tokens
        slots = input_ids == self.image_token_id
        regressed = predicted_slots(slots, document_ids)
        source = predicting_positions(regressed)
        error = self.regress(hidden[source]).float() - targets[regressed[slots]].float()
        per_slot = error.abs() if self.cfg.regression_loss == "l1" else error.square()
        images = num_images if num_images is not None else targets.shape[0] // q
        return {IMAGE_REGRESSION: per_slot.mean(-1).sum() / max(images * q, 1)}


@torch.no_grad()
def generate_image_features(
    model: Emu2, prompts: Sequence[Sequence[int]], pad_token_id: int = 0
) -> torch.Tensor:
    """(B, Q, encoder width) fp32: an image's pooled features generated after each prompt (token
    ids; end a prompt with `<img>` when the model was trained with image boundaries), one per
    step: `regress` on the last hidden state gives the next feature, which, projected as an
    encoded feature is, becomes the next input (Emu2's autoregression in feature space)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    q = model.num_image_tokens
    weight = model.decoder.embed_tokens.weight
    batch = left_pad(prompts, pad_token_id, weight.device)
    room = batch.input_ids.shape[1] + q - 1  # the last feature is never fed back
    cache = KVCache(model.cfg.decoder, len(prompts), room, weight.device, weight.dtype)
    hidden = model.decoder(
        inputs_embeds=model.embed(batch.input_ids, None),
        position_ids=batch.position_ids,
        document_ids=batch.document_ids,
        cache=cache,
        return_hidden=True,
    )[:, -1:]
    position = batch.position_ids[:, -1:]
    features = [model.regress(hidden)]
    for _ in range(q - 1):
        position = position + 1
        hidden = model.decoder(
            inputs_embeds=model.connector.proj(features[-1]),
            position_ids=position,
            document_ids=torch.ones_like(position),
            cache=cache,
            return_hidden=True,
        )
        features.append(model.regress(hidden))
    return torch.cat(features, dim=1).float()


def _validate(cfg: ModelConfig, prefix: str) -> None:
    if cfg.connector.type != CONNECTOR:
        raise ConfigError(
            f"{prefix}.connector.type={cfg.connector.type}: model.family=emu2 regresses the "
            f"pooled features its connector projects, which needs the {CONNECTOR} connector"
        )
    cfg.connector.validate(f"{prefix}.connector", cfg)
    if cfg.image_layout.type != "single":
        raise ConfigError(
            f"{prefix}.image_layout.type={cfg.image_layout.type}: model.family=emu2 reads each "
            "image as one crop (single), as Emu2 does; its features are what it generates"
        )


def _describe(cfg: ModelConfig) -> str:
    v, q = cfg.vision, MM1_FAMILY.num_image_tokens(cfg)
    return (
        f"{v.variant} ViT ({v.layers} blocks) -> avgpool to {q} features -> Linear; "
        f"a head regresses the next feature ({cfg.regression_loss})"
    )


EMU2_FAMILY = FAMILIES.register("emu2")(
    ModelFamily(
        "emu2",
        Emu2,
        mm1_hf,
        MM1_FAMILY.blocks,  # MM1's parts, and one Linear more
        MM1_FAMILY.init_buffers,
        num_image_tokens=MM1_FAMILY.num_image_tokens,
        validate=_validate,
        describe=_describe,
        image_loss=IMAGE_REGRESSION,
        image_parts_of="mm1",
    )
)
