"""Parameter counts and FLOPs of an MM1 model, computed on the meta device (no weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mm1.config import ModelConfig
from mm1.models.family import family_spec
from mm1.models.mllm import MLLM
from mm1.tiling import fuyu_canvas


def build_meta(cfg: ModelConfig) -> MLLM:
    """The model with every tensor on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return family_spec(cfg.family).model(cfg)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def active_parameters(module: torch.nn.Module) -> int:
    """Parameters that act on each token: all of them, less what submodules declare idle per
    token through an `inactive_parameters() -> int` method (e.g. the experts a router does not
    choose). Equal to the parameter count for a dense model."""
    idle = sum(
        m.inactive_parameters() for m in module.modules() if hasattr(m, "inactive_parameters")
    )
    return _count(module) - idle


@dataclass
class ModelSummary:
    vision: int
    connector: int
    decoder: int  # all decoder parameters, embeddings included
    # decoder parameters acting on each token (= decoder when dense): the N of the MM1 lr law
    # and of the FLOPs
    active: int
    embeddings: int  # input embedding table (+ the output head when untied)
    decoder_flops_per_token: float  # training (fwd + bwd) FLOPs per decoder token
    image_flops: float  # training FLOPs of encoder + connector (+ image heads) per image
    image_tokens: int
    seq_len: int
    # Parameters of a family's own heads beside those parts (emu2's regression head), which run
    # once per image slot; their training FLOPs are in `image_flops`.
    heads: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.connector + self.decoder + self.heads

    def flops_per_token(self, images_per_seq: float) -> float:
        """Training FLOPs per sequence token with `images_per_seq` images in each sequence."""
        return self.decoder_flops_per_token + self.image_flops * images_per_seq / self.seq_len


def summarize(cfg: ModelConfig, seq_len: int | None = None) -> ModelSummary:
    """Parameters per component and training FLOPs.

    Decoder FLOPs per token follow torchtitan / PaLM: 6 N' + 12 L d T, where N' counts the
    active parameters (`active_parameters`) without the input embedding table (a lookup, not a
    matmul) but with the output head, and T is the sequence length. Encoder and connector FLOPs are counted exactly (torch's FLOP counter on
    the meta device, forward x 3 for training).
    """
    model = build_meta(cfg)
    d = cfg.decoder
    t = seq_len or d.max_seq_len
    emb = model.decoder.embed_tokens.weight.numel()
    head = 0 if d.tie_embeddings else model.decoder.lm_head.weight.numel()
    decoder = _count(model.decoder)
    active = active_parameters(model.decoder)
    matmul_params = active - emb + (emb if d.tie_embeddings else 0)
    attn = 12 * d.layers * d.heads * d.resolved_head_dim * t
    newline = 0 if model.image_newline is None else model.image_newline.numel()
    height = width = cfg.vision.image_size
    if cfg.image_layout.type == "fuyu":  # one crop: Fuyu's canvas, rectangular or not
        height, width = fuyu_canvas(cfg.image_layout.canvas, cfg.vision.image_size)
    with FlopCounterMode(display=False) as counter:
        model.image_features(torch.empty(1, 3, height, width, device="meta"))
    heads = _count(model) - _count(model.vision) - _count(model.connector) - newline - decoder
    # forward + backward (x 3); a frozen image tokenizer (chameleon's VQ) runs forward only
    passes = 1 if family_spec(cfg.family).image_tokenizer else 3
    return ModelSummary(
        vision=_count(model.vision),
        # the learned newline (anyres, fuyu) is the connector's, as a starting point counts it
        connector=_count(model.connector) + newline,
        decoder=decoder,
        active=active,
        embeddings=emb + head,
        decoder_flops_per_token=6 * matmul_params + attn,
        image_flops=passes * counter.get_total_flops() + 6 * heads * model.num_image_tokens,
        image_tokens=model.num_image_tokens,
        seq_len=t,
        heads=heads,
    )
