"""SEED's image tokenizer (Ge et al., "Planting a SEED of Vision in Large Language Model", 2023,
and SEED-LLaMA): discrete image tokens in a 1D causal order, with the semantics of a CLIP space.

Tokenize: a frozen ViT (`model.vision`, started from a CLIP run) gives the patch features; a
causal Q-Former's `num_queries` learned queries read them (causal self-attention among the
queries, cross-attention to the patches); each output, a "causal embedding", is projected to
`code_dim`, l2-normalised and snapped to the nearest code of an EMA codebook (`mm1.models.vq`'s
quantiser). So token i depends on the image and on the queries before it, never on a patch
position. De-tokenize: a transformer decodes the codes' vectors back to the causal embeddings
and, pooled, to a generation embedding in the CLIP run's image-embedding space (SEED-LLaMA aligns
it with unCLIP-SD's image embedding, from which a diffusion model draws the image; mm1 has no
such decoder, so a seed model's images come out as embeddings).

Training (`SEEDModel`, `mm1 train-encoder` with `encoder.objective: seed`) is one stage where SEED
trains two (first the Q-Former, then the codebook and decoder with the Q-Former frozen); the sum
of
  - contrastive: the final causal embedding (the last query's, which has read all the others)
    against the caption's embedding by the CLIP run's frozen text tower (SEED's stage I;
    symmetric InfoNCE over every rank's pairs, a learned temperature);
  - reconstruction: 1 - cosine of each decoded causal embedding to the (stop-gradient) causal
    embedding itself (stage II);
  - generation: 1 - cosine of the generation embedding to the frozen CLIP image embedding
    (SEED-LLaMA's target; a mean squared error on unCLIP's own scale there, where a diffusion
    model reads the vector's norm);
  - beta x the commitment loss (`encoder.vq`), the gradient passing the quantiser straight
    through, the codebook an EMA of the assigned projections with dead codes restarted.
The straight-through gradients of reconstruction and generation reach the Q-Former too (SEED's
stage II keeps it frozen): with one stage, they are what makes the queries before the last one
carry the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import ModelConfig, SEEDConfig, VisionConfig
from mm1.config.encoder import CLIPObjectiveConfig, TextTowerConfig, VQObjectiveConfig
from mm1.models.clip import EncoderOutput, TextSide, causal_mask
from mm1.models.contrastive import gathered_clip_loss, global_mean
from mm1.models.layers import init_weights
from mm1.models.vision import VisionTransformer, ViTAttention, ViTBlock
from mm1.models.vq import EMACodebook, full_precision


class QFormerBlock(ViTBlock):
    """A pre-LN block whose tokens (the queries) attend to each other under `mask`, then to the
    patch features (cross-attention), then pass the MLP."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(cfg)
        self.cross_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.cross_attn = ViTAttention(cfg.width, cfg.heads)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None, context: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        x = x + self.cross_attn(self.cross_norm(x), context=context)
        return x + self.mlp(self.layer_norm2(x))


class SEEDTokenizer(EMACodebook):
    """Pixels (N, 3, H, W) -> codes (N, num_queries) in causal order; codes -> generation
    embeddings (N, embed_dim). The ViT (`vit`) and CLIP's image projection (`image_proj`, which
    gives the generation embedding's target) are a CLIP run's, frozen."""

    def __init__(self, vision: VisionConfig, cfg: SEEDConfig) -> None:
        super().__init__(cfg.codebook_size, cfg.code_dim)
        self.cfg = cfg
        w, q = vision.width, cfg.num_queries
        self.vit = VisionTransformer(vision)
        self.image_proj = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.embed_dim, bias=False))
        self.queries = nn.Parameter(torch.zeros(1, q, w))
        self.context_norm = nn.LayerNorm(w, eps=vision.norm_eps)
        self.qformer = nn.ModuleList(QFormerBlock(vision) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(w, eps=vision.norm_eps)
        self.to_code = nn.Linear(w, cfg.code_dim)
        self.from_code = nn.Linear(cfg.code_dim, w)
        self.decoder_pos = nn.Parameter(torch.zeros(1, q, w))
        self.decoder_blocks = nn.ModuleList(ViTBlock(vision) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(w, eps=vision.norm_eps)
        self.generation_head = nn.Linear(w, cfg.embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights(self)
        self.vit.reset_parameters()
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        self.reset_codebook()

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, patches, width): the frozen ViT's patch features."""
        with torch.no_grad():
            return self.vit(pixels)

    def target_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim): the CLIP run's image embedding of the patch features (frozen)."""
        with torch.no_grad():
            return self.image_proj(features.mean(1))

    def causal_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(N, Q, width): the Q-Former's outputs; query i reads the patches and queries < i."""
        context = self.context_norm(features)
        x = self.queries.expand(features.shape[0], -1, -1).to(context.dtype)
        mask = causal_mask(x.shape[1], x.device)
        for block in self.qformer:
            x = block(x, mask, context)
        return self.norm(x)

    def latents(self, causal: torch.Tensor) -> torch.Tensor:
        """(N, Q, code_dim): the l2-normalised projections the codebook quantises."""
        return F.normalize(self.to_code(causal).float(), dim=-1)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, Q, code_dim) code vectors -> (N, Q, width): the causal embeddings' reconstruction."""
        x = self.from_code(vectors.to(self.from_code.weight.dtype)) + self.decoder_pos
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)

    def generation_embedding(self, decoded: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim): the generation embedding of decoded causal embeddings."""
        return self.generation_head(decoded.mean(1))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, Q) long: each image's codes in causal order, computed at the weights' own
        precision whatever autocast is on (the same codes in training and evaluation)."""
        with full_precision(pixels.device):
            features = self.features(pixels.to(self.to_code.weight.dtype))
            z = self.latents(self.causal_embeddings(features))
        return self.codes_of(z)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, Q) codes -> (N, embed_dim): their generation embeddings (in the CLIP image
        space: `target_embedding` gives an image's own)."""
        if codes.shape[1] != self.cfg.num_queries:
            raise ValueError(
                f"{codes.shape[1]} codes per image; the tokenizer writes {self.cfg.num_queries}"
            )
        return self.generation_embedding(self.decode_vectors(self.code_vectors(codes)))


class SEEDModel(TextSide):
    """The tokenizer (`vision`, the name a seed model's `train.init.vision` reads it under),
    the CLIP run's frozen text tower and projection, and the trained contrastive projection of
    the final causal embedding with its temperature. `gathered`: every loss term is the global
    batch's on every rank (the contrastive one over every rank's pairs, the others the mean of
    the ranks' means)."""

    gathered = True

    def __init__(
        self,
        model: ModelConfig,
        text: TextTowerConfig,
        clip: CLIPObjectiveConfig,
        objective: VQObjectiveConfig,
        vocab: int,
        text_tower: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = model
        self.objective = objective
        e = model.seed.embed_dim
        self.vision = SEEDTokenizer(model.vision, model.seed)
        self.build_text_side(text, clip, vocab, e, text_tower)
        self.contrast_proj = nn.Linear(model.vision.width, e, bias=False)
        init_weights(self.text_proj)
        init_weights(self.contrast_proj)
        for frozen in (self.vision.vit, self.vision.image_proj, self.text, self.text_proj):
            frozen.requires_grad_(False)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The contrastive embedding of the final causal embedding (`mm1 eval-encoder`)."""
        tok = self.vision
        return self.contrast_proj(tok.causal_embeddings(tok.features(pixel_values))[:, -1])

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        tok = self.vision
        features = tok.features(pixel_values)
        target = tok.target_embedding(features)
        with torch.no_grad():
            text = self.encode_text(input_ids, lengths)
        causal = tok.causal_embeddings(features)
        q = tok.quantise(tok.latents(causal), self.objective, generator)
        decoded = tok.decode_vectors(q.vectors)
        scale = self.scale()
        contrastive = gathered_clip_loss(self.contrast_proj(causal[:, -1]), text, scale)
        cosine = F.cosine_similarity(decoded.float(), causal.detach().float(), dim=-1)
        reconstruction = global_mean(1 - cosine.mean())
        generated = tok.generation_embedding(decoded).float()
        generation = global_mean(1 - F.cosine_similarity(generated, target.float(), dim=-1).mean())
        commitment = global_mean(q.commitment)
        loss = contrastive + reconstruction + generation + self.objective.beta * commitment
        metrics = {
            "contrastive": float(contrastive.detach()),
            "reconstruction": float(reconstruction.detach()),
            "generation": float(generation.detach()),
            "commitment": float(commitment.detach()),
            "logit_scale": float(scale.detach()),
            **tok.usage(q.codes),
            "codes_restarted": float(q.restarted),
        }
        return EncoderOutput(loss, metrics)
