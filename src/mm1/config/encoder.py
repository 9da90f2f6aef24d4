"""The config of an image-encoder pre-training run (`mm1 train-encoder`): a run config plus an
`encoder:` section naming the objective (CLIP, AIM, VQ or SEED) and its own parts. The ViT
trained (CLIP, AIM) is `model.vision`, the very module MM1 uses; the VQ tokenizer trained is
`model.vq`, the one a chameleon model reads images with; the SEED tokenizer trained is
`model.seed`, over the frozen ViT and text tower of a CLIP run (`train.init.vision`), the one a
seed model reads images with. Either way the run is a `train.init.vision` starting point."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mm1.config.loading import load_config
from mm1.config.schema import ACTIVATIONS, Config, ConfigError, SEEDConfig, VQConfig
from mm1.fs import read_json

ENCODER_OBJECTIVES = ("clip", "aim", "vq", "seed")
# Objectives whose loss reads each image's caption (through the text tower).
TEXT_OBJECTIVES = ("clip", "seed")
# Source kinds whose records pair images with text (CLIP) / carry images at all (AIM, VQ).
CLIP_SOURCE_KINDS = ("captions",)
AIM_SOURCE_KINDS = ("captions", "interleaved", "sft")


@dataclass
class TextTowerConfig:
    """CLIP's text tower: a causal transformer from scratch; its feature is the output at the
    caption's last token (EOS), as CLIP's is, projected into the joint space."""

    width: int = 128
    layers: int = 3
    heads: int = 4
    mlp_dim: int = 512
    act: str = "gelu"
    norm_eps: float = 1e-5
    max_len: int = 48  # tokens per caption, EOS included (longer captions are cut)
    # The width the text projection reads: 0 = `width`. Set it to declare the projection's
    # input explicitly (a tower loaded elsewhere); it must equal `width`.
    proj_in: int = 0
    # An HF CLIP text model directory (CLIPTextModel, or a CLIPModel's text half, with its
    # tokenizer.json): the tower starts from it and its tokenizer is the run's; the shape keys
    # above are then its own, and `width` must equal its hidden size. None: from scratch.
    hf: str | None = None


@dataclass
class CLIPObjectiveConfig:
    embed_dim: int = 128  # the joint image-text space
    # The learned temperature as CLIP keeps it: logit scale = exp(t), t starts at ln(1/0.07)
    # and exp(t) is clamped at 100.
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0


@dataclass
class AIMObjectiveConfig:
    """AIM: prefix-causal attention over the patches, a pixel head predicting every next
    patch's per-patch normalised pixels; the loss counts the patches after the prefix."""

    head_dim: int = 256  # hidden width of the pixel head's MLP
    head_layers: int = 2  # MLP layers of the pixel head
    min_prefix: int = 1  # the prefix length is drawn per image in [min_prefix, patches - 1]
    norm_eps: float = 1e-6  # in the per-patch variance normalisation of the targets


@dataclass
class VQObjectiveConfig:
    """VQ: reconstruction (mean squared error) + beta x commitment loss, the codebook an EMA of
    the outputs assigned to each code, dead codes restarted; the tokenizer's shape is
    `model.vq`. The quantiser of a SEED tokenizer (`encoder.objective: seed`) is set here too."""

    beta: float = 0.25  # the commitment loss's weight (VQ-VAE's and SEED's 0.25)
    decay: float = 0.99  # the codebook's EMA decay per update (one per micro-batch; VQ-VAE-2's)
    # A code whose EMA count of assigned outputs (per update, over all ranks) falls below this
    # restarts at a random output of the batch; 0 = never.
    dead_below: float = 0.1


@dataclass
class EncoderConfig:
    objective: str = "clip"
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    clip: CLIPObjectiveConfig = field(default_factory=CLIPObjectiveConfig)
    aim: AIMObjectiveConfig = field(default_factory=AIMObjectiveConfig)
    vq: VQObjectiveConfig = field(default_factory=VQObjectiveConfig)


@dataclass
class EncoderRunConfig(Config):
    encoder: EncoderConfig = field(default_factory=EncoderConfig)


def load_encoder_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> EncoderRunConfig:
    """An encoder run's config, validated (the run sections as `load_config` does, then
    `encoder` and the data it needs)."""
    cfg = load_config(path, overrides, schema_type=EncoderRunConfig)
    assert isinstance(cfg, EncoderRunConfig)
    validate_encoder(cfg)
    return cfg


def validate_encoder(cfg: EncoderRunConfig) -> None:
    """One-line errors naming the key: the objective, the towers' shapes, a contrastive batch
    of at least two pairs per rank, and sources that give what the objective reads."""
    e = cfg.encoder
    if e.objective not in ENCODER_OBJECTIVES:
        raise ConfigError(
            f"encoder.objective={e.objective!r} is not one of {', '.join(ENCODER_OBJECTIVES)}"
        )
    if cfg.train.lora.rank:
        raise ConfigError(
            f"train.lora.rank={cfg.train.lora.rank}: LoRA adapts an MM1 decoder (mm1 train); an "
            "encoder run trains its encoder whole"
        )
    t = e.text
    for k in ("width", "layers", "heads", "mlp_dim", "max_len"):
        if getattr(t, k) <= 0:
            raise ConfigError(f"encoder.text.{k}={getattr(t, k)} must be positive")
    if t.act not in ACTIVATIONS:
        raise ConfigError(f"encoder.text.act={t.act!r} is not one of {', '.join(ACTIVATIONS)}")
    if t.width % t.heads:
        raise ConfigError(f"encoder.text.width={t.width} is not divisible by heads={t.heads}")
    if t.proj_in and t.proj_in != t.width:
        raise ConfigError(
            f"encoder.text.proj_in={t.proj_in} does not match encoder.text.width={t.width}: "
            "the text projection reads the tower's output"
        )
    if t.hf is not None:
        _check_hf_text(t)
    if e.clip.embed_dim <= 0:
        raise ConfigError(f"encoder.clip.embed_dim={e.clip.embed_dim} must be positive")
    if not e.clip.logit_scale_max > 1.0:
        raise ConfigError(f"encoder.clip.logit_scale_max={e.clip.logit_scale_max} must be > 1")
    if math.exp(e.clip.logit_scale_init) > e.clip.logit_scale_max:
        raise ConfigError(
            f"encoder.clip.logit_scale_init={e.clip.logit_scale_init} starts above "
            f"encoder.clip.logit_scale_max={e.clip.logit_scale_max} (exp(init) is the scale)"
        )
    a, v = e.aim, cfg.model.vision
    if a.head_dim <= 0 or a.head_layers <= 0:
        raise ConfigError("encoder.aim.head_dim and encoder.aim.head_layers must be positive")
    if not 1 <= a.min_prefix < v.num_patches:
        raise ConfigError(
            f"encoder.aim.min_prefix={a.min_prefix} must be within 1..{v.num_patches - 1} "
            f"(the encoder has {v.num_patches} patches)"
        )
    if not (math.isfinite(e.vq.beta) and e.vq.beta >= 0):
        raise ConfigError(f"encoder.vq.beta={e.vq.beta} must be a finite number >= 0")
    if not 0 <= e.vq.decay < 1:
        raise ConfigError(f"encoder.vq.decay={e.vq.decay} must be in [0, 1)")
    if not (math.isfinite(e.vq.dead_below) and e.vq.dead_below >= 0):
        raise ConfigError(f"encoder.vq.dead_below={e.vq.dead_below} must be a finite number >= 0")
    if e.objective == "vq":
        validate_vq(cfg.model.vq, cfg.model.vision.image_size, "model")
    if e.objective == "seed":
        validate_seed(cfg.model.seed, "model")
        if not cfg.train.init.vision:
            raise ConfigError(
                "train.init.vision is not set: encoder.objective=seed reads images with the "
                "frozen ViT of a CLIP run and aligns with its frozen text tower (name the run, "
                "e.g. train.init.vision=runs/encoder_clip)"
            )
    if e.objective in TEXT_OBJECTIVES and cfg.train.micro_batch_size < 2:
        raise ConfigError(
            f"train.micro_batch_size={cfg.train.micro_batch_size}: a contrastive loss needs at "
            "least 2 image-text pairs per rank and micro-batch (the others are the negatives)"
        )
    allowed = CLIP_SOURCE_KINDS if e.objective in TEXT_OBJECTIVES else AIM_SOURCE_KINDS
    for key, sources in (
        ("data.sources", cfg.data.sources),
        ("data.val_sources", cfg.data.val_sources),
    ):
        for i, s in enumerate(sources):
            if s.resolved_kind not in allowed:
                what = "image-caption pairs" if e.objective in TEXT_OBJECTIVES else "images"
                raise ConfigError(
                    f"{key}[{i}].kind={s.resolved_kind!r} ({s.path}): encoder.objective="
                    f"{e.objective} trains on {what} (kinds: {', '.join(allowed)})"
                )


def validate_vq(vq: VQConfig, image_size: int, prefix: str) -> None:
    """`model.vq`'s shape against the image size it tokenizes."""
    if not vq.channels or any(c <= 0 for c in vq.channels):
        raise ConfigError(f"{prefix}.vq.channels={vq.channels} must be a non-empty list of widths")
    for k in ("codebook_size", "code_dim"):
        if getattr(vq, k) <= 0:
            raise ConfigError(f"{prefix}.vq.{k}={getattr(vq, k)} must be positive")
    if image_size % vq.downsample:
        raise ConfigError(
            f"{prefix}.vision.image_size={image_size} is not a multiple of the tokenizer's "
            f"downsampling 2^len({prefix}.vq.channels) = {vq.downsample}"
        )


def validate_seed(seed: SEEDConfig, prefix: str) -> None:
    """`model.seed`'s sizes (the Q-Former and decoder take the ViT's width and heads)."""
    for k in ("num_queries", "layers", "decoder_layers", "codebook_size", "code_dim", "embed_dim"):
        if getattr(seed, k) <= 0:
            raise ConfigError(f"{prefix}.seed.{k}={getattr(seed, k)} must be positive")


def _check_hf_text(t: TextTowerConfig) -> None:

    path = Path(t.hf or "")
    if not (path / "config.json").is_file():
        raise ConfigError(f"encoder.text.hf={t.hf}: no HF checkpoint (config.json) there")
    raw = read_json(path / "config.json")
    hf = raw.get("text_config") or raw
    if hf.get("hidden_size") != t.width:
        raise ConfigError(
            f"encoder.text.width={t.width} does not match the hidden size {hf.get('hidden_size')} "
            f"of encoder.text.hf={t.hf}: the text projection reads the tower's output"
        )
    limit = hf.get("max_position_embeddings", t.max_len)
    if t.max_len > limit:
        raise ConfigError(
            f"encoder.text.max_len={t.max_len} exceeds the {limit} positions of "
            f"encoder.text.hf={t.hf}"
        )
