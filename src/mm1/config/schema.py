"""The config dataclasses of every section of a run: models, data, training, evaluation."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

VISION_VARIANTS = ("clip", "siglip")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "silu", "relu", "relu2")
DEMO_SELECTIONS = ("random", "rices")
BAD_IMAGE_POLICIES = ("error", "empty")
ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flex")
ROPE_TYPES = ("default", "linear", "llama3")
NORM_TYPES = ("rms", "layer")
# The built-in auxiliary losses (a MoE decoder's router losses, `mm1.models.moe`; an emu2
# model's regression of image features, `mm1.models.emu2`; a chameleon model's cross-entropy
# on its image codes, `mm1.models.chameleon`), weighted by `train.aux_loss_weights`; a
# registered FFN may emit others.
IMAGE_REGRESSION = "image_regression"
IMAGE_CODES = "image_codes"
AUX_LOSSES = ("router_balance", "router_z", IMAGE_REGRESSION, IMAGE_CODES)
REGRESSION_LOSSES = ("l1", "mse")  # `model.regression_loss`
LOGIT_Z = "logit_z"  # the output z-loss's name among the auxiliary losses (`train.z_loss`)


@dataclass
class VisionConfig:
    """A ViT image encoder (CLIP or SigLIP layout)."""

    variant: str = "clip"
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    # Index into the encoder's hidden states as transformers counts them: 0 = embeddings,
    # i = output of block i, -1 = last block (before the final norm), -2 = LLaVA's choice.
    feature_layer: int = -1
    # Deprecated: train.init.vision (read from here with a warning, see `apply_deprecated_keys`).
    init: str | None = None

    @property
    def cls_token(self) -> bool:
        return self.variant == "clip"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class ConnectorConfig:
    """The vision-language connector: (B, N, Dv) patch features -> (B, Q, D_llm) image tokens.

    The options every connector has; each registered type extends it with its own (e.g.
    `mm1.models.connectors.CAbstractorConfig`) and validates them (`validate`)."""

    type: str = "c_abstractor"
    # Q, the number of image tokens per image. 0 = as many as the encoder gives patches (the
    # only choice for linear / mlp, which map patch to token).
    num_tokens: int = 144

    def validate(self, key: str, model: ModelConfig) -> None:
        if self.num_tokens < 0:
            raise ConfigError(f"{key}.num_tokens={self.num_tokens} must be >= 0")


@dataclass
class FFNConfig:
    """The decoder block's feed-forward module; each registered type extends it with its own
    options (`decoder.ffn: {type: swiglu}`; the string `swiglu` means the same)."""

    type: str = "swiglu"

    def validate(self, key: str, model: ModelConfig) -> None:
        pass


@dataclass
class RopeScalingConfig:
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class DecoderConfig:
    """A Llama-style decoder LLM."""

    vocab_size: int = 32000
    dim: int = 2048
    layers: int = 24
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 0  # 0 = dim // heads
    ffn_dim: int = 5632
    # The FFN module: a registered type's FFNConfig, written as a mapping ({type: swiglu, ...})
    # or just the type's name; parsed into the type's dataclass by `resolve_components`.
    ffn: Any = field(default_factory=lambda: {"type": "swiglu"})
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_seq_len: int = 4096
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # a bias on the attention's output projection too (Persimmon)
    # rms: RMSNorm (Llama); layer: LayerNorm with a bias (Persimmon). The q/k norm is the same kind.
    norm: str = "rms"
    # The share of each head's dimensions that RoPE rotates (the first ones; Persimmon: 0.5).
    rope_fraction: float = 1.0
    tie_embeddings: bool = False
    sliding_window: int = 0  # 0 = full causal attention (Mistral checkpoints may set it)
    # sdpa: scaled_dot_product_attention with a dense document mask (any device); varlen: causal
    # SDPA over documents grouped by length (no score across documents is computed); flex:
    # FlexAttention with a document block mask (compiled on GPU); auto: varlen for rows of at
    # least `VARLEN_MIN_LEN` tokens, sdpa for shorter ones (where the dense mask costs less).
    attention: str = "auto"
    init: str | None = None  # deprecated: train.init.decoder (see `apply_deprecated_keys`)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.heads

    @property
    def rope_dim(self) -> int:
        """The dimensions of each head that RoPE rotates (transformers' `rotary_ndims`)."""
        return int(self.resolved_head_dim * self.rope_fraction)

    @property
    def ffn_type(self) -> str:
        """The FFN's registered name, parsed or not."""
        f = self.ffn
        return (
            f
            if isinstance(f, str)
            else f.get("type", "swiglu")
            if isinstance(f, Mapping)
            else f.type
        )


IMAGE_LAYOUTS = ("single", "mm1", "anyres", "dynamic", "fuyu")
OVERVIEW_PLACES = ("first", "last")


@dataclass
class ImageLayoutConfig:
    """How an image becomes encoder inputs (crops of `vision.image_size`) and image tokens.

    single: the image is one crop (Q tokens). mm1: the image at twice the crop size cut into
    2 x 2 crops, after the overview at crop size (5Q). anyres (LLaVA-NeXT): the base image,
    then the tiles of the canvas `select_best_resolution` picks, assembled into one unpadded
    grid with a learned newline token after each row. dynamic (InternVL / MM1.5): the grid of
    min..max tiles closest to the image's aspect ratio, with an overview when it has more than
    one tile. fuyu (`model.family: fuyu` only): Fuyu's canvas, the image kept whole on it (shrunk
    to fit, padded), its tokens only the patches that cover it."""

    type: str = "single"
    # anyres canvases as [width, height] px; or `grid: [lo, hi]`, every (i x j) crops with
    # lo <= i, j <= hi; neither: LLaVA-NeXT v1.6's five canvases at this crop size.
    pinpoints: list[list[int]] | None = None
    grid: list[int] | None = None
    min_tiles: int = 1  # dynamic
    max_tiles: int = 6  # dynamic
    overview: str = "last"  # dynamic: the overview crop before ("first") or after the tiles
    # fuyu: Fuyu's canvas as [height, width] px (Fuyu-8B: [1080, 1920]); none = the square of
    # model.vision.image_size.
    canvas: list[int] | None = None
    # Crops per encoder call (0 = all of a batch's crops at once): bounds activation memory.
    encoder_chunk: int = 0


@dataclass
class VQConfig:
    """A VQ image tokenizer (`model.family: chameleon`; trained by `mm1 train-encoder` with
    `encoder.objective: vq`): a convolutional encoder downsampling the image `2 ** len(channels)`
    times, each cell's vector snapped to the nearest of `codebook_size` codes (one token each),
    and a decoder mirroring the encoder from the codes back to pixels."""

    # The width after each stride-2 stage of the encoder (the decoder's, reversed): four stages
    # = 16x downsampling, Chameleon's (512 px -> 32 x 32 tokens).
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    codebook_size: int = 1024  # Chameleon's: 8192
    code_dim: int = 32  # the width of a code (codes and encoder outputs are l2-normalised)

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)


@dataclass
class SEEDConfig:
    """A SEED image tokenizer (`model.family: seed`; Ge et al., "Planting a SEED of Vision in
    Large Language Model", 2023; trained by `mm1 train-encoder` with `encoder.objective: seed`):
    a causal Q-Former whose `num_queries` learned queries read the frozen ViT of `model.vision`,
    each output projected to `code_dim`, snapped to the nearest of `codebook_size` codes (one
    token each, in the queries' 1D causal order); a transformer of `decoder_layers` blocks
    decodes the codes back to the causal embeddings and to a generation embedding in the CLIP
    space of width `embed_dim` (SEED's, unCLIP's image embedding). The Q-Former and the decoder
    are as wide as the ViT (its heads, MLP and activation)."""

    num_queries: int = 32  # SEED's 32 tokens per image
    layers: int = 2  # Q-Former blocks (causal self-attention, cross-attention to the ViT, MLP)
    decoder_layers: int = 2
    codebook_size: int = 1024  # SEED's: 8192
    code_dim: int = 32  # SEED's low-dimensional codes (codes and projections l2-normalised)
    embed_dim: int = 128  # the CLIP run's joint space (`encoder.clip.embed_dim`)


@dataclass
class ModelConfig:
    family: str = "mm1"  # a registered model family (`mm1.models.family`)
    vision: VisionConfig = field(default_factory=VisionConfig)
    # A registered type's ConnectorConfig ({type: ..., its options}); parsed into the type's
    # dataclass by `resolve_components`.
    connector: Any = field(default_factory=lambda: {"type": "c_abstractor"})
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Token id of the image placeholder slots in input_ids; -1 = the last id of the vocabulary
    # (where the tokenizer's added `<image>` lands); set from the tokenizer by the data side.
    image_token_id: int = -1
    init_std: float = 0.02
    image_layout: ImageLayoutConfig = field(default_factory=ImageLayoutConfig)
    # The loss on regressed image features, for a family that predicts them (emu2): l1 (the
    # talk's) or mse (squared error), each a mean over the feature's channels.
    regression_loss: str = "l1"
    # The VQ image tokenizer of a family that reads images as discrete codes (chameleon).
    vq: VQConfig = field(default_factory=VQConfig)
    # The SEED image tokenizer (a causal Q-Former's discrete codes) of `model.family: seed`.
    seed: SEEDConfig = field(default_factory=SEEDConfig)

    @property
    def resolved_image_token_id(self) -> int:
        return self.image_token_id if self.image_token_id >= 0 else self.decoder.vocab_size - 1

    @property
    def num_image_tokens(self) -> int:
        """Q, the image tokens of one crop, as the family counts them (`mm1.models.family`)."""
        from mm1.config.validation import family_of_config  # validation imports this module

        return family_of_config(self).num_image_tokens(self)


# ---------------------------------------------------------------------------------------------
# Data, training, evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """One data source of the mixture."""

    format: str = MISSING  # wds | obelics | mmc4 | text | llava | llava_yaml | coco (captions)
    path: str = MISSING  # a file, a directory of shards, or a glob
    weight: float = 1.0
    # The dataset's name in per-dataset losses (`loss_ds_<name>`); empty = from the path
    # (`source_names`). Letters, digits, `_`, `-`, `.`; unique among the sources.
    name: str = ""
    # captions | interleaved | text | sft: how documents are packed and whose loss they count
    # in; empty = from the format (wds: captions, obelics / mmc4: interleaved, llava: sft).
    kind: str = ""
    image_root: str | None = None  # local image folder (obelics paths, mmc4, llava)
    # Read record image paths that leave image_root (absolute, or climbing out with `..`);
    # off, such records are skipped and counted (`absolute_path`, `path_outside_root`).
    allow_absolute_paths: bool = False

    @property
    def resolved_kind(self) -> str:
        return self.kind or FORMAT_KINDS[self.format]


def source_names(sources: Sequence[SourceConfig]) -> list[str]:
    """Each source's dataset name: its `name`, else the stem of the last path component that
    is not a pattern (`data/cc3m/{00000..00009}.tar` -> `cc3m`), else `source{i}`; a derived
    name already taken gets `_{i}` appended, so the names are unique."""
    taken = {s.name for s in sources if s.name}
    names: list[str] = []
    for i, s in enumerate(sources):
        name = s.name
        if not name:
            name = _path_stem(s.path) or f"source{i}"
            while name in taken:
                name = f"{name}_{i}"
        taken.add(name)
        names.append(name)
    return names


_DATA_SUFFIXES = (".json", ".jsonl", ".gz", ".tar", ".parquet", ".yaml", ".yml", ".txt", ".zst")


def _path_stem(path: str) -> str:
    for part in reversed(Path(path).parts):
        if any(c in part for c in "*?[{"):
            continue
        while Path(part).suffix.lower() in _DATA_SUFFIXES:
            part = part[: -len(Path(part).suffix)]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", part).strip("._")
        if stem:
            return stem
    return ""


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# Must match mm1.data.sources.FORMATS (the readers); a test checks that they agree.
SOURCE_FORMATS = ("wds", "obelics", "mmc4", "text", "llava", "llava_yaml", "coco")
FORMAT_KINDS = {
    "wds": "captions",
    "coco": "captions",
    "obelics": "interleaved",
    "mmc4": "interleaved",
    "text": "text",
    "llava": "sft",
    "llava_yaml": "sft",
}
SOURCE_KINDS = ("captions", "interleaved", "text", "sft")
# Formats whose images are files next to (or under a folder named by) `image_root`; wds shards
# and text sources carry no image paths.
IMAGE_ROOT_FORMATS = ("obelics", "mmc4", "llava", "llava_yaml", "coco")


@dataclass
class DataConfig:
    world: str = "data/world"  # the synthetic world's directory (written if absent)
    world_size: str = "tiny"
    world_seed: int = 0
    world_text_scale: float = 1.0  # text around images: 1 web-like, 0 compact (see write_world)
    world_image_size: int = 64  # pixels a side the world's images are drawn at
    tokenizer: str | None = None  # tokenizer.json (or a dir); default: the world's
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 2048
    max_images_per_seq: int = 16
    # Image slots between <img> and </img>. None (the default): as the starting point was
    # trained (the prompt format saved with train.init.decoder / .weights; a resumed run keeps
    # its own), False without one. The trainer resolves it before anything reads it.
    image_boundaries: bool | None = None
    val_sources: list[SourceConfig] = field(default_factory=list)  # default: the world's
    num_workers: int = 0
    pack_buffer: int = 32  # pieces the packer chooses from when filling a sequence
    max_error_rate: float = 0.01
    seed: int = 0
    # Decoded pixels per image (0 = no cap): above it a JPEG is decoded at 1/2, 1/4 or 1/8
    # scale and anything still larger is reduced; images within it decode exactly.
    max_image_pixels: int = 4096 * 4096
    # Characters of text per record (0 = no cap): a longer record is skipped and counted
    # (`too_long_text`) rather than tokenized whole, which costs the tokenizer ~170 bytes per
    # character (a 256 MB gzip-bombed line would take tens of GB). 4M characters is ~0.7 GB and
    # ~3 s, far beyond a web document; a corpus of whole books may need more.
    max_text_chars: int = 4_000_000
    # The share of caption pairs ([image, caption] records, kind captions) written caption
    # first, [caption, image]: text before an image is what a model that generates images
    # learns from (emu2's regression). Chosen per record by its id and data.seed, the same at
    # every read (resume); 0: every pair image first, as MM1 trains.
    caption_first: float = 0.0
    # How SFT conversations are written: "" = the tokenizer's chat template (plain if it has
    # none), a built-in (plain, vicuna_v1, chatml, llama3) or a .jinja file; saved with the run.
    chat_template: str = ""


@dataclass
class OptimConfig:
    lr: float = 0.0  # 0 = the MM1 peak-lr law for the decoder's size
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    vision_lr_mult: float = 1.0


# The decoder layers LoRA adapters can sit on (`mm1.models.lora`).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# How the adapted layers' frozen weights are stored: as they are, or in NF4 (QLoRA).
LORA_QUANTIZE = ("none", "nf4")


@dataclass
class LoRAConfig:
    """LoRA fine-tuning of the decoder (`rank` > 0): its `targets` linear layers in every block
    get adapters s B A (s = alpha / rank), which train while the decoder's own weights stay
    frozen; the vision encoder and the connector train as `train.train_vision` /
    `train_connector` say (LLaVA's LoRA recipe trains the connector, not the encoder). The
    run's checkpoints hold the adapters; whatever reads them for inference or as a starting
    point gets the weights merged. `quantize: nf4` is QLoRA: the adapted layers' frozen weights
    are held in 4-bit NormalFloat (about 1/8 of fp32's memory; `pip install 'mm1[qlora]'`)."""

    rank: int = 0  # 0 = off (full fine-tuning of what trains)
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input (LLaVA: 0.05)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    quantize: str = "none"  # none | nf4 (QLoRA: the targets' frozen weights in 4 bits)


@dataclass
class InitConfig:
    """Where a run's starting weights come from (the architecture stays in `model`).

    `weights` is a run directory (its newest checkpoint), one of its checkpoints
    (RUN/checkpoints/step_N) or an exported directory: every part of the model starts from it.
    `vision`, `decoder` and `connector` override one part each: an HF checkpoint directory
    (CLIP / SigLIP for vision, Llama / Qwen2 / Mistral for the decoder; its architecture replaces
    the config's) or an mm1 run / export (its part of the model; the config's architecture, the
    weights adapted by the loading chain: position embeddings, vocabulary). Parts named nowhere
    start from random. A resumed run ignores all of this: it continues from its own checkpoint.
    A dense decoder started into a MoE `model.decoder.ffn` is upcycled on the fly (each expert a
    copy of its layer's FFN, a small random router; `mm1.models.upcycle`), an HF or LLaVA
    directory's too: the configured MoE FFN is kept over its dense architecture.
    """

    weights: str | None = None
    vision: str | None = None
    connector: str | None = None
    decoder: str | None = None
    upcycle_noise: float = 0.0  # relative Gaussian noise on upcycled experts (0: exact copies)
    upcycle_seed: int = 0  # the upcycled routers' random stream


INIT_PARTS = ("vision", "connector", "decoder")


# A trace takes tens of MB per step of a real model, and minutes to write.
PROFILE_MAX_STEPS = 20


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    init: InitConfig = field(default_factory=InitConfig)
    steps: int = 200000
    batch_size: int = 512  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    train_vision: bool = True
    train_connector: bool = True
    train_decoder: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: str = "fsdp"  # fsdp | ddp | none
    # FSDP2 shards the model over groups of this many processes and replicates it across the
    # groups (HSDP: the GPUs of one node, e.g. 8, so only gradients cross nodes); 0 = over all.
    shard_size: int = 0
    dtype: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    val_every: int = 500  # 0 = no held-out validation
    val_batches: int = 4
    save_every: int = 1000
    keep_checkpoints: int = 3
    max_nonfinite_in_a_row: int = 5  # consecutive skipped (non-finite) steps before aborting
    tensorboard: bool = True
    # torch.profiler over steps profile_at .. profile_at + profile_steps - 1 (0 = off): a
    # Chrome trace and an operator table per rank in RUN/profile/ (train/profiling.py); at
    # most PROFILE_MAX_STEPS steps.
    profile_at: int = 0
    profile_steps: int = 2
    # Weight of each auxiliary loss the model emits, by name; a loss without a weight here
    # stops the run at its first step. Dense models emit none; a MoE decoder emits the router's
    # load balance and z-loss (defaults: MM1's 0.01 and 0.001, from a secondary source); an
    # emu2 model its image regression, a chameleon model its image codes' cross-entropy
    # (defaults 1: text and image losses weigh alike).
    aux_loss_weights: dict[str, float] = field(
        default_factory=lambda: dict(zip(AUX_LOSSES, (0.01, 0.001, 1.0, 1.0), strict=True))
    )
    # The output z-loss's weight: log(Z)^2 of the head's softmax at each label token, averaged
    # as the cross-entropy is, keeps the logits from drifting (PaLM: 1e-4; Chameleon trains
    # with it). 0: not computed. Logged as `aux_loss_logit_z`.
    z_loss: float = 0.0
    wandb: str = "off"  # off | offline | online (online falls back to offline without a key)
    progress: bool = True
    seed: int = 0


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["synth_coco", "synth_vqa"])
    shots: list[int] = field(default_factory=lambda: [0, 4, 8])
    seeds: int = 3
    max_new_tokens: int = 20  # captions; VQA answers take 5
    num_beams: int = 1  # 1 = greedy; 3 = OpenFlamingo's beam search
    # Greedy decode steps compiled at fixed shapes (models/compiled_decode.py; CUDA graphs on
    # GPU): the same predictions up to floating-point rounding, after a compile of a few steps.
    compile: bool = False
    batch_size: int = 8
    max_examples: int = 0  # 0 = every query of each task; N = the first N (reported as a subset)
    vqa_max_new_tokens: int = 5  # answers are short (OpenFlamingo's VQA setting)
    length_penalty: float = 0.0  # beam hypotheses scored by summed log-probs (OpenFlamingo)
    demo_selection: str = "random"  # or "rices": demonstrations retrieved by image similarity
    zero_shot_text_demos: bool = True  # OpenFlamingo's 0-shot: two text-only demonstrations
    shuffle_images: bool = False  # control: every query shown another query's image
    bad_images: str = "error"  # or "empty": queries showing an undecodable image score empty
    # A tiled image layout: only a prompt's last N images are tiled, the rest `single` (MM1's
    # many-shot prompts); 0 = every image.
    high_res_last: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
