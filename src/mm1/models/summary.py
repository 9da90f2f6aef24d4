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
    # The parts of those FLOPs, for runs that freeze some parts (`flops_per_token`'s `trained`):
    # the decoder's matmul parameters and attention FLOPs per token, and the forward FLOPs of the
    # encoder and of the connector (with whatever else runs on an image) per image.
    matmul_params: int = 0
    attention_flops_per_token: float = 0.0
    vision_forward_flops: float = 0.0
    connector_forward_flops: float = 0.0
    image_tokenizer: bool = False

    @property
    def total(self) -> int:
        return self.vision + self.connector + self.decoder + self.heads

    def flops_per_token(self, images_per_seq: float, trained: Trained | None = None) -> float:
        """Training FLOPs per sequence token with `images_per_seq` images in each sequence,
        every part training, or the parts `trained` says: a frozen part computes no gradients
        for its weights (2 FLOPs per weight and token fewer), and one with nothing trained
        below it none for its input either (the encoder of a run that freezes it: forward
        only). A frozen image tokenizer runs forward only either way. As the 6 N convention,
        this counts norms' weights as matmuls' and a part's first input gradient, which
        autograd skips where nothing below trains, as computed."""
        if trained is None:
            return self.decoder_flops_per_token + self.image_flops * images_per_seq / self.seq_len
        m = self.matmul_params
        # forward, the input gradients every trained part below the loss needs, the weights'
        decoder = 4 * m + 2 * m * trained.decoder + self.attention_flops_per_token
        decoder += 6 * trained.adapters
        v, c = self.vision_forward_flops, self.connector_forward_flops
        if self.image_tokenizer:
            image = v + c
        else:  # a part trains (3 F), passes gradients down to one that does (2 F), or neither
            tv, tc = trained.vision, trained.connector
            image = v * (1 + 2 * tv) + c * (1 + (tv or tc) + tc)
        image += 6 * self.heads * self.image_tokens
        return decoder + image * images_per_seq / self.seq_len


@dataclass(frozen=True)
class Trained:
    """Which parts of a run train (`train.train_vision` / `train_connector` / `train_decoder`);
    `adapters`: the LoRA parameters training in a frozen decoder."""

    vision: bool = True
    connector: bool = True
    decoder: bool = True
    adapters: int = 0


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
    image_forward = counter.get_total_flops()
    # The encoder's share, counted under its class (fuyu's patchify does no FLOPs: none).
    per_module = counter.get_flop_counts().get(type(model.vision).__name__, {})
    vision_forward = sum(per_module.values())
    heads = _count(model) - _count(model.vision) - _count(model.connector) - newline - decoder
    # forward + backward (x 3); a frozen image tokenizer (chameleon's VQ) runs forward only
    tokenizer = bool(family_spec(cfg.family).image_tokenizer)
    passes = 1 if tokenizer else 3
    return ModelSummary(
        vision=_count(model.vision),
        # the learned newline (anyres, fuyu) is the connector's, as a starting point counts it
        connector=_count(model.connector) + newline,
        decoder=decoder,
        active=active,
        embeddings=emb + head,
        decoder_flops_per_token=6 * matmul_params + attn,
        image_flops=passes * image_forward + 6 * heads * model.num_image_tokens,
        image_tokens=model.num_image_tokens,
        seq_len=t,
        heads=heads,
        matmul_params=matmul_params,
        attention_flops_per_token=attn,
        vision_forward_flops=vision_forward,
        connector_forward_flops=image_forward - vision_forward,
        image_tokenizer=tokenizer,
    )
