"""Typed configuration for every section of a run, loaded from YAML with dotted overrides.

OmegaConf structured configs do the parsing and type checking (an unknown key or a value of the
wrong type is rejected with the full dotted key); `validate` adds the semantic checks that types
cannot express, each naming its key. Connectors, FFNs and model families are looked up in their
registries (`mm1.registry`), which import the modules that register them on first use; this
module imports nothing of mm1 but the registry.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mm1.registry import CONNECTORS, FAMILIES, FFNS, Registry

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

VISION_VARIANTS = ("clip", "siglip")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "silu")
DEMO_SELECTIONS = ("random", "rices")
BAD_IMAGE_POLICIES = ("error", "empty")
ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flex")
ROPE_TYPES = ("default", "linear", "llama3")


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

    @property
    def resolved_image_token_id(self) -> int:
        return self.image_token_id if self.image_token_id >= 0 else self.decoder.vocab_size - 1

    @property
    def num_image_tokens(self) -> int:
        resolve_components(self)
        return self.connector.num_tokens or self.vision.num_patches


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


_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")

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
    """

    weights: str | None = None
    vision: str | None = None
    connector: str | None = None
    decoder: str | None = None


INIT_PARTS = ("vision", "connector", "decoder")


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
    parallel: str = "fsdp"  # fsdp | ddp | none
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
    # Weight of each auxiliary loss the model emits, by name (e.g. {router_balance: 0.01}); a
    # loss without a weight here stops the run at its first step. Dense models emit none.
    aux_loss_weights: dict[str, float] = field(default_factory=dict)
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
    batch_size: int = 8
    max_examples: int = 0  # 0 = every query of each task; N = the first N (reported as a subset)
    vqa_max_new_tokens: int = 5  # answers are short (OpenFlamingo's VQA setting)
    length_penalty: float = 0.0  # beam hypotheses scored by summed log-probs (OpenFlamingo)
    demo_selection: str = "random"  # or "rices": demonstrations retrieved by image similarity
    zero_shot_text_demos: bool = True  # OpenFlamingo's 0-shot: two text-only demonstrations
    shuffle_images: bool = False  # control: every query shown another query's image
    bad_images: str = "error"  # or "empty": queries showing an undecodable image score empty


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive")


def parse_component(registry: Registry, key: str, raw: Any, base: type) -> Any:
    """The typed options of a registered part, from its name, a mapping (`type` and the type's
    options) or a config dataclass; `base` is the kind's common dataclass (ConnectorConfig,
    FFNConfig), used for a type registered without options of its own.

    Keys that another registered type of the kind declares are ignored, so the flat keys of
    older configs (every connector option side by side) and a type switched by an override
    still read; a key no type declares is an error naming it."""
    if isinstance(raw, str):
        raw = {"type": raw}
    elif dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw = {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)}
    elif isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}={raw!r} must be a {registry.kind} name or a mapping with a type")
    name = raw.get("type", base.type)
    entry = registry.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ConfigError(
            f"{key}.type={name!r} is not a registered {registry.kind}; {registry.registered()}"
        )
    cls = entry.config or base
    own = {f.name for f in dataclasses.fields(cls)}
    others = {f.name for c in registry.configs() for f in dataclasses.fields(c)}
    unknown = sorted(set(raw) - own - others)
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]} is not an option of {registry.kind} {name!r} "
            f"(its options: {', '.join(sorted(own))})"
        )
    try:
        node = OmegaConf.merge(
            OmegaConf.structured(cls), {k: v for k, v in raw.items() if k in own}
        )
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        sub = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{key}.{sub}: {msg}" if sub else f"{key}: {msg}") from None


def resolve_components(m: ModelConfig, prefix: str = "model") -> ModelConfig:
    """Parse `m.connector` and `m.decoder.ffn` into their types' dataclasses, in place
    (idempotent: a parsed config is kept as it is)."""
    for registry, holder, key, base in (
        (CONNECTORS, m, "connector", ConnectorConfig),
        (FFNS, m.decoder, "decoder.ffn", FFNConfig),
    ):
        attr = key.rsplit(".", 1)[-1]
        raw = getattr(holder, attr)
        entry = registry.get(raw.type) if isinstance(raw, base) else None
        if entry is None or type(raw) is not (entry.config or base):
            setattr(holder, attr, parse_component(registry, f"{prefix}.{key}", raw, base))
    return m


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    """Checks of the model section; parses the connector and FFN options first
    (`resolve_components`), then lets each validate its own."""
    v, d = m.vision, m.decoder
    if FAMILIES.get(m.family) is None:
        raise ConfigError(
            f"{prefix}.family={m.family!r} is not a registered model family; "
            f"{FAMILIES.registered()}"
        )
    _choice(f"{prefix}.vision.variant", v.variant, VISION_VARIANTS)
    _choice(f"{prefix}.vision.act", v.act, ACTIVATIONS)
    for k in ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim"):
        _positive(f"{prefix}.vision.{k}", getattr(v, k))
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"{prefix}.vision.image_size={v.image_size} is not a multiple of "
            f"{prefix}.vision.patch_size={v.patch_size}"
        )
    if v.width % v.heads:
        raise ConfigError(f"{prefix}.vision.width={v.width} is not divisible by heads={v.heads}")
    if not -(v.layers + 1) <= v.feature_layer <= v.layers:
        raise ConfigError(
            f"{prefix}.vision.feature_layer={v.feature_layer} is outside the encoder's "
            f"{v.layers + 1} hidden states (-{v.layers + 1}..{v.layers})"
        )

    resolve_components(m, prefix)
    m.connector.validate(f"{prefix}.connector", m)
    d.ffn.validate(f"{prefix}.decoder.ffn", m)
    _choice(f"{prefix}.decoder.attention", d.attention, ATTENTION_BACKENDS)
    _choice(f"{prefix}.decoder.rope_scaling.type", d.rope_scaling.type, ROPE_TYPES)
    for k in ("vocab_size", "dim", "layers", "heads", "kv_heads", "ffn_dim", "max_seq_len"):
        _positive(f"{prefix}.decoder.{k}", getattr(d, k))
    if d.heads % d.kv_heads:
        raise ConfigError(
            f"{prefix}.decoder.heads={d.heads} is not a multiple of kv_heads={d.kv_heads}"
        )
    if not d.head_dim and d.dim % d.heads:
        raise ConfigError(f"{prefix}.decoder.dim={d.dim} is not divisible by heads={d.heads}")
    if d.resolved_head_dim % 2:
        raise ConfigError(f"{prefix}.decoder.head_dim must be even for rotary embeddings")
    if m.image_token_id >= d.vocab_size:
        raise ConfigError(
            f"{prefix}.image_token_id={m.image_token_id} is outside the vocabulary "
            f"(decoder.vocab_size={d.vocab_size})"
        )


_DEPRECATION_WARNED: set[str] = set()


def apply_deprecated_keys(cfg: Config) -> Config:
    """Move the starting weights still named in the architecture (`model.vision.init`,
    `model.decoder.init`) to `train.init`, with a warning (once per key); in place, idempotent.
    Both set to different directories is an error."""
    for part in ("vision", "decoder"):
        section = getattr(cfg.model, part)
        old = section.init
        if not old:
            continue
        new = getattr(cfg.train.init, part)
        if new is not None and new != old:
            raise ConfigError(
                f"model.{part}.init={old} and train.init.{part}={new} disagree: keep "
                f"train.init.{part} (model.{part}.init is deprecated)"
            )
        if part not in _DEPRECATION_WARNED:
            _DEPRECATION_WARNED.add(part)
            log.warning(
                "model.%s.init is deprecated: starting weights are train.init.%s (read as that)",
                part,
                part,
            )
        setattr(cfg.train.init, part, old)
        section.init = None
    return cfg


def deprecated_keys_in_dict(d: dict[str, Any]) -> dict[str, Any]:
    """`apply_deprecated_keys` on a plain config dict (a saved config.yaml, maybe written before
    `train.init` existed); in place, silent."""
    train = d.setdefault("train", {})
    init = train.setdefault("init", {})
    for k in ("weights", *INIT_PARTS):
        init.setdefault(k, None)
    for part in ("vision", "decoder"):
        section = d.get("model", {}).get(part, {})
        if section.get("init"):
            init[part] = init[part] or section["init"]
            section["init"] = None
    return d


def has_starting_weights(init: InitConfig) -> bool:
    return any(getattr(init, k) for k in ("weights", *INIT_PARTS))


def validate(cfg: Config) -> None:
    """Semantic checks across the whole config; raises ConfigError naming the key."""
    validate_model(cfg.model)
    d, t = cfg.data, cfg.train
    _positive("data.seq_len", d.seq_len)
    _positive("data.max_images_per_seq", d.max_images_per_seq)
    if not 0.0 <= d.max_error_rate <= 1.0:
        raise ConfigError(f"data.max_error_rate={d.max_error_rate} must be within [0, 1]")
    if d.max_image_pixels < 0:
        raise ConfigError(f"data.max_image_pixels={d.max_image_pixels} must be >= 0 (0 = no cap)")
    _choice("data.world_size", d.world_size, ("tiny", "small", "medium"))
    if d.world_text_scale < 0:
        raise ConfigError(f"data.world_text_scale={d.world_text_scale} must be >= 0")
    for key, sources in (("data.sources", d.sources), ("data.val_sources", d.val_sources)):
        named: dict[str, int] = {}
        for i, s in enumerate(sources):
            _choice(f"{key}[{i}].format", s.format, SOURCE_FORMATS)
            if s.name and not _SOURCE_NAME.fullmatch(s.name):
                raise ConfigError(
                    f"{key}[{i}].name={s.name!r} may hold only letters, digits, '_', '-' and '.'"
                )
            if s.name in named:
                raise ConfigError(
                    f"{key}[{i}].name={s.name!r} is also {key}[{named[s.name]}]'s name: "
                    "source names must be unique"
                )
            if s.name:
                named[s.name] = i
            if s.kind:
                _choice(f"{key}[{i}].kind", s.kind, SOURCE_KINDS)
            if s.weight < 0:
                raise ConfigError(f"{key}[{i}].weight={s.weight} must be >= 0")
            if s.image_root is not None and s.format not in IMAGE_ROOT_FORMATS:
                raise ConfigError(
                    f"{key}[{i}].image_root is set, but the {s.format} format has no image "
                    f"paths to resolve (image_root applies to {', '.join(IMAGE_ROOT_FORMATS)})"
                )
            if s.allow_absolute_paths and s.format not in IMAGE_ROOT_FORMATS:
                raise ConfigError(
                    f"{key}[{i}].allow_absolute_paths is set, but the {s.format} format has no "
                    f"image paths (it applies to {', '.join(IMAGE_ROOT_FORMATS)})"
                )
    if d.sources and sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("data.sources: the weights sum to zero")
    n_img = cfg.model.num_image_tokens + 2 * bool(d.image_boundaries)  # <img> slots </img>
    if n_img >= d.seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} cannot hold one image of {n_img} tokens "
            "(model.connector.num_tokens, data.image_boundaries)"
        )
    for k in ("weights", *INIT_PARTS):
        value = getattr(t.init, k)
        if value is not None and not value.strip():
            raise ConfigError(f"train.init.{k} is empty: name a directory, or leave it unset")
    _choice("train.parallel", t.parallel, ("fsdp", "ddp", "none"))
    _choice("train.dtype", t.dtype, ("auto", "float32", "bfloat16"))
    _choice("train.wandb", t.wandb, ("off", "offline", "online"))
    for k in ("steps", "batch_size", "micro_batch_size", "log_every", "save_every"):
        _positive(f"train.{k}", getattr(t, k))
    if t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if t.optim.lr < 0:
        raise ConfigError(f"train.optim.lr={t.optim.lr} must be >= 0 (0 = the MM1 law)")
    if not t.optim.grad_clip >= 0:
        raise ConfigError(
            f"train.optim.grad_clip={t.optim.grad_clip} must be >= 0 (0 = no clipping)"
        )
    for name, w in t.aux_loss_weights.items():
        if not w >= 0:
            raise ConfigError(f"train.aux_loss_weights.{name}={w} must be >= 0")
    if not 0 <= t.optim.min_lr_ratio <= 1:
        raise ConfigError(f"train.optim.min_lr_ratio={t.optim.min_lr_ratio} must be in [0, 1]")
    validate_eval(cfg.eval)


def validate_eval(e: EvalConfig) -> None:
    if not e.shots:
        raise ConfigError("eval.shots is empty: give shot counts like [0, 4, 8]")
    for i, s in enumerate(e.shots):
        if s < 0:
            raise ConfigError(f"eval.shots[{i}]={s} must be >= 0")
    for k in ("seeds", "max_new_tokens", "vqa_max_new_tokens", "num_beams", "batch_size"):
        _positive(f"eval.{k}", getattr(e, k))
    _choice("eval.demo_selection", e.demo_selection, DEMO_SELECTIONS)
    _choice("eval.bad_images", e.bad_images, BAD_IMAGE_POLICIES)
    if e.max_examples < 0:
        raise ConfigError(f"eval.max_examples={e.max_examples} must be >= 0 (0 = every query)")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

EXTENDS_KEY = "extends"  # a YAML may build on others: `extends: [models/mm1_3b.yaml]`


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), shown: str | None = None) -> DictConfig:
    # Messages name the file as the user wrote it (`shown`), not its resolved symlink target;
    # resolving is only for cycle detection and for `extends` relative to the real file.
    shown = shown or str(path)
    real = path.resolve()
    if real in seen:
        raise ConfigError(f"{shown}: circular '{EXTENDS_KEY}'")
    if not real.is_file():
        raise ConfigError(f"config file not found: {shown}")
    try:
        raw = OmegaConf.load(real)
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{shown}: the top level must be a mapping of sections")
    parents = raw.pop(EXTENDS_KEY, None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create({})
    for parent in parents:
        label = f"{parent} ('{EXTENDS_KEY}' of {shown})"
        merged = OmegaConf.merge(merged, _read_yaml(real.parent / parent, (*seen, real), label))
    return OmegaConf.merge(merged, raw)


def _check_fixed_tuples(raw: Any, schema: type, where: str, prefix: str = "") -> None:
    """Name the key of a fixed-length tuple given the wrong number of values
    (`train.optim.betas=[0.9]`): OmegaConf reports that without any key."""
    if not isinstance(raw, dict):
        return
    hints = get_type_hints(schema)
    for f in fields(schema):
        value, hint, key = raw.get(f.name), hints[f.name], f"{prefix}{f.name}"
        if is_dataclass(hint):
            _check_fixed_tuples(value, hint, where, f"{key}.")  # type: ignore[arg-type]
        elif get_origin(hint) is tuple and Ellipsis not in get_args(hint):
            n = len(get_args(hint))
            if isinstance(value, list) and len(value) != n:
                example = list(f.default) if isinstance(f.default, tuple) else None
                raise ConfigError(
                    f"{key}={value} ({where}): needs exactly {n} values"
                    + (f", e.g. {example}" if example else "")
                )


def _check_source_keys(raw: DictConfig, where: str) -> None:
    """Name a misspelt key of a source entry with its list position (`data.sources[0].pth`):
    OmegaConf reports list elements without their path."""
    known = set(SourceConfig.__dataclass_fields__)
    data = raw.get("data") if isinstance(raw, DictConfig) else None
    for key in ("sources", "val_sources"):
        entries = data.get(key) if isinstance(data, DictConfig) else None
        for i, entry in enumerate(entries if isinstance(entries, ListConfig) else []):
            bad = sorted(set(entry) - known) if isinstance(entry, DictConfig) else []
            if bad:
                raise ConfigError(
                    f"data.{key}[{i}].{bad[0]} ({where}): not a source key; known: "
                    f"{', '.join(sorted(known))}"
                )


def _friendly(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return ConfigError(f"{key}: {msg}" if key else msg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with `extends`), apply `section.key=value` overrides, validate."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            raw = _read_yaml(Path(path))
            _check_source_keys(raw, str(path))
            _check_fixed_tuples(OmegaConf.to_container(raw), Config, str(path))
            merged = OmegaConf.merge(merged, raw)
        if overrides:
            for o in overrides:
                if "=" not in o:
                    raise ConfigError(f"override {o!r} is not of the form section.key=value")
            dotlist = OmegaConf.from_dotlist(list(overrides))
            _check_source_keys(dotlist, "the command line")
            _check_fixed_tuples(OmegaConf.to_container(dotlist), Config, "the command line")
            merged = OmegaConf.merge(merged, dotlist)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _friendly(err) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # e.g. a mapping where the schema has a list
        where = f"{path}: " if path is not None else ""
        hint = "a list written as a mapping? data.sources is a list: - {format: ..., path: ...}"
        raise ConfigError(f"{where}{err} ({hint})") from None
    apply_deprecated_keys(cfg)
    validate(cfg)
    return cfg


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build and validate a ModelConfig from a plain dict (e.g. an exported config.json)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(d))
        m: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _friendly(err) from None
    validate_model(m)
    return m


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of any config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_eval_config(saved: str | Path | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    """The `eval` section of a run's saved config (the defaults without one), then `eval.*`
    overrides; validated. `mm1 eval RUN` scores a run with the settings its own report used."""
    bad = [o for o in overrides if "=" not in o or not o.startswith("eval.")]
    if bad:
        known = ", ".join(EvalConfig.__dataclass_fields__)
        raise ConfigError(f"override {bad[0]!r}: give eval.KEY=VALUE, KEY one of {known}")
    merged = OmegaConf.structured(Config)
    if saved is not None:
        try:
            raw = OmegaConf.load(saved)
            section = raw.get("eval") if isinstance(raw, DictConfig) else None
            if section is not None:
                merged = OmegaConf.merge(merged, {"eval": section})
        except yaml.YAMLError as err:
            raise ConfigError(f"{saved}: not valid YAML: {' '.join(str(err).split())}") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"{_friendly(err)} ({saved})") from None
    try:
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        e: EvalConfig = OmegaConf.to_object(merged.eval)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_friendly(err)} (the command line)") from None
    validate_eval(e)
    return e
