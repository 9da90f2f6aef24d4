"""A Chameleon-style model (`model.family: chameleon`; Chameleon Team, "Chameleon: Mixed-Modal
Early-Fusion Foundation Models", 2024; the CM3 line): discrete image tokens in, text and
discrete image tokens out, one vocabulary.

A VQ tokenizer (`model.vq`, `mm1.models.vq`; trained beforehand by `mm1 train-encoder` with
`encoder.objective: vq` and read with `train.init.vision`, frozen here) turns each image into
(image size / 2^S)^2 codes. The K codes are K more tokens of the decoder's vocabulary, after the
text tokenizer's V (ids V .. V + K - 1): an image's slots are filled with its codes'
embeddings, and the output head scores text and image tokens alike (early fusion: no encoder,
no connector). Beside the text's cross-entropy, the cross-entropy on the image codes is the
auxiliary loss `image_codes`, predicted where Emu2 regresses its features (the `<img>` with
`data.image_boundaries`, else the token before the image; never across documents), summed and
divided by the step's image slots, weighted by `train.aux_loss_weights.image_codes`. So `loss`
stays the text's (comparable with an MM1 run's), and the text-and-image mean Chameleon trains is
the weighted sum. Chameleon's QK-norm (`model.decoder.qk_norm`) and output z-loss
(`train.z_loss`) are the decoder's and the trainer's switches.

Text is written with the image codes masked out (`text_logits`); an image is generated
(`generate_image_codes`) with the text tokens masked out, and decoded to pixels by the
tokenizer's decoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import IMAGE_CODES, ConfigError, ModelConfig
from mm1.config.encoder import validate_vq
from mm1.models.decoder import Decoder
from mm1.models.family import MM1_FAMILY, ModelFamily, decoder_blocks, mm1_hf
from mm1.models.generation import Sampling, left_pad, next_token
from mm1.models.kv_cache import KVCache
from mm1.models.mllm import MLLM, predicted_slots, predicting_positions
from mm1.models.vq import EMACodebook, VQTokenizer
from mm1.registry import FAMILIES


class Chameleon(MLLM):
    """A frozen VQ tokenizer (`vision`) and a decoder whose vocabulary holds its codes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.vision = self.build_tokenizer()
        self.vision.requires_grad_(False)  # trained on its own (`mm1 train-encoder`)
        self.connector = nn.Identity()  # early fusion: the codes' embeddings are the tokens
        vocab = self.cfg.decoder.vocab_size + self.vision.codebook_size
        self.decoder = Decoder(
            dataclasses.replace(self.cfg.decoder, vocab_size=vocab), cfg.init_std
        )
        self.image_newline = None

    def build_tokenizer(self) -> EMACodebook:
        """The image tokenizer: an `EMACodebook` with `encode` (pixels -> codes) and `decode`."""
        return VQTokenizer(self.cfg.vq)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.vision.reset_parameters()
        self.decoder.init_weights()

    @property
    def code_offset(self) -> int:
        """The token id of code 0: the text vocabulary's size."""
        return self.cfg.decoder.vocab_size

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.num_image_tokens  # the family's count

    def image_codes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, Q) token ids of the crops' codes, at most `encoder_chunk` crops per call (the
        tokenizer is frozen and sharded with the root, so no call is collective)."""
        chunk = self.cfg.image_layout.encoder_chunk or len(pixel_values) or 1
        codes = [self.vision.encode(part) for part in pixel_values.split(chunk)]
        return torch.cat(codes) + self.code_offset

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed(self.image_codes(pixel_values))

    def image_tokens(
        self,
        pixel_values: torch.Tensor,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.image_tokens_and_targets(pixel_values)[0]

    def image_tokens_and_targets(
        self,
        pixel_values: torch.Tensor,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes' embeddings, and the codes themselves (token ids): the targets."""
        codes = self.image_codes(pixel_values).reshape(-1)
        return self.decoder.embed(codes), codes

    def text_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.code_offset]

    def image_losses(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        document_ids: torch.Tensor | None,
        targets: torch.Tensor | None,
        num_images: int | None,
    ) -> dict[str, torch.Tensor]:
        """`image_codes`: the cross-entropy (over the whole vocabulary) of each predicted image
        slot's code, summed and divided by the step's image slots (`num_images` x Q), so
        micro-batches and ranks add up to the step's mean whatever the accumulation."""
        if targets is None:  # no image in this batch (the head is in the text loss's graph)
            return {IMAGE_CODES: hidden.new_zeros((), dtype=torch.float32)}
        q = self.num_image_tokens
        slots = input_ids == self.image_token_id
        predicted = predicted_slots(slots, document_ids)
        logits = self.decoder.lm_head(hidden[predicting_positions(predicted)]).float()
        ce = F.cross_entropy(logits, targets[predicted[slots]], reduction="sum")
        images = num_images if num_images is not None else targets.shape[0] // q
        return {IMAGE_CODES: ce / max(images * q, 1)}


@torch.no_grad()
def generate_image_codes(
    model: Chameleon,
    prompts: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    unconditional: Sequence[int] = (),
) -> torch.Tensor:
    """(B, Q) codes (0 .. K - 1) of an image generated after each prompt (token ids; end a
    prompt with `<img>` when the model was trained with image boundaries), one per step with the
    text tokens masked out: greedy unless `sampling` says otherwise. `model.vision.decode`
    turns them into pixels (chameleon) or generation embeddings (seed).

    `guidance_scale` != 1 is classifier-free guidance (Ho & Salimans 2022; for image tokens,
    Make-A-Scene and CM3leon): each step's code logits are `u + guidance_scale * (c - u)`, c after the
    prompt and u after `unconditional` (the prompt of an image with no caption before it, as an
    image-first pair starts), both fed the codes drawn so far; 0 draws unconditional images."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    guided = guidance_scale != 1.0
    if guided and not unconditional:
        raise ValueError("classifier-free guidance needs the unconditional prompt")
    sampling = sampling or Sampling()
    q, offset = model.num_image_tokens, model.code_offset
    weight = model.decoder.embed_tokens.weight
    rows = [*prompts, *[unconditional] * len(prompts)] if guided else prompts
    batch = left_pad(rows, pad_token_id, weight.device)
    room = batch.input_ids.shape[1] + q - 1  # the last code is never fed back
    cache = KVCache(model.decoder.cfg, len(rows), room, weight.device, weight.dtype)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        scores = logits[:, -1, offset:].float()
        if guided:
            cond, uncond = scores.chunk(2)
            scores = uncond + guidance_scale * (cond - uncond)
        return next_token(scores, sampling, generator)

    codes = [
        draw(
            model.decoder(
                inputs_embeds=model.decoder.embed(batch.input_ids),
                position_ids=batch.position_ids,
                document_ids=batch.document_ids,
                cache=cache,
            )
        )
    ]
    position = batch.position_ids[:, -1:]
    for _ in range(q - 1):
        position = position + 1
        fed = codes[-1].repeat(2) if guided else codes[-1]  # each code to both halves
        codes.append(
            draw(
                model.decoder(
                    inputs_embeds=model.decoder.embed(fed[:, None] + offset),
                    position_ids=position,
                    document_ids=torch.ones_like(position),
                    cache=cache,
                )
            )
        )
    return torch.stack(codes, dim=1)


def _num_image_tokens(cfg: ModelConfig) -> int:
    return (cfg.vision.image_size // cfg.vq.downsample) ** 2


def _validate(cfg: ModelConfig, prefix: str) -> None:
    validate_vq(cfg.vq, cfg.vision.image_size, prefix)
    if cfg.image_layout.type != "single":
        raise ConfigError(
            f"{prefix}.image_layout.type={cfg.image_layout.type}: model.family=chameleon reads "
            "each image as one grid of codes (single), as Chameleon does"
        )


def _describe(cfg: ModelConfig) -> str:
    vq, size = cfg.vq, cfg.vision.image_size
    side = size // vq.downsample
    return (
        f"no encoder: a VQ tokenizer ({vq.downsample}x down, {vq.codebook_size} codes) -> "
        f"{side} x {side} codes of a {size}px image, each a token of the vocabulary"
    )


CHAMELEON_FAMILY = FAMILIES.register("chameleon")(
    ModelFamily(
        "chameleon",
        Chameleon,
        mm1_hf,
        decoder_blocks,
        MM1_FAMILY.init_buffers,  # the decoder's RoPE buffers
        num_image_tokens=_num_image_tokens,
        validate=_validate,
        describe=_describe,
        has_encoder=False,
        image_loss=IMAGE_CODES,
        image_tokenizer="vq",
        codebook_size=lambda cfg: cfg.vq.codebook_size,
    )
)
