"""Semantic checks that types cannot express, each naming its key; registered components
(connectors, FFNs, families) are parsed and validated by their own option dataclasses."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mm1.config.schema import (
    ACTIVATIONS,
    ATTENTION_BACKENDS,
    BAD_IMAGE_POLICIES,
    DEMO_SELECTIONS,
    IMAGE_LAYOUTS,
    IMAGE_REGRESSION,
    IMAGE_ROOT_FORMATS,
    INIT_PARTS,
    LOGIT_Z,
    LORA_QUANTIZE,
    LORA_TARGETS,
    NORM_TYPES,
    OVERVIEW_PLACES,
    PROFILE_MAX_STEPS,
    REGRESSION_LOSSES,
    ROPE_TYPES,
    SOURCE_FORMATS,
    SOURCE_KINDS,
    SOURCE_NAME,
    VISION_VARIANTS,
    Config,
    ConfigError,
    ConnectorConfig,
    EvalConfig,
    FFNConfig,
    InitConfig,
    ModelConfig,
    TrainConfig,
    VisionConfig,
)
from mm1.registry import CONNECTORS, FAMILIES, FFNS, Registry
from mm1.tiling import canvas_candidates  # stdlib-only arithmetic


@functools.cache
def structured_schema(cls: type) -> DictConfig:
    """The OmegaConf schema of a config dataclass, built once (about 20 ms for `Config`). Never
    changed in place: `OmegaConf.merge` copies its first argument."""
    return OmegaConf.structured(cls)


log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive")


def _non_negative(key: str, value: float, zero: str = "") -> None:
    """`zero` says what 0 means for the key (e.g. "0 = no cap"), shown in the message."""
    if value < 0:
        raise ConfigError(f"{key}={value} must be >= 0" + (f" ({zero})" if zero else ""))


def _check_finite(value: Any, key: str) -> None:
    """Every float in a config (dataclass fields, nested sections, lists, tuples and mappings of
    them) must be finite: nan or inf passes a `< 0` check, then trains the weights to NaN (an
    lr) or fails deep in torch without the key. No float of the config gives inf a meaning."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")


def parse_component(registry: Registry, key: str, raw: Any, base: type) -> Any:
    """The typed options of a registered part, from its name, a mapping (`type` and the type's
    options) or a config dataclass; `base` is the kind's common dataclass (ConnectorConfig,
    FFNConfig), used for a type registered without options of its own.

    Keys that another registered type of the kind declares are ignored with a warning (once
    per key and value), so the flat keys of older configs (every connector option side by
    side) and a type switched by an override still read, yet a key meant for a type not chosen
    (`ffn.experts` without `ffn.type=moe`) is not dropped silently; a key no type declares is
    an error naming it."""
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
    _warn_other_types(registry, key, raw, name, own)
    try:
        node = OmegaConf.merge(structured_schema(cls), {k: v for k, v in raw.items() if k in own})
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        sub = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{key}.{sub}: {msg}" if sub else f"{key}: {msg}") from None


_IGNORED_WARNED: set[str] = set()


def _warn_other_types(
    registry: Registry, key: str, raw: Mapping[str, Any], name: str, own: set[str]
) -> None:
    """Warn about each key of `raw` that only other types than `name` declare. A warning, not
    an error: a type switched by an override (`model.connector.type=avgpool` over a parent
    YAML's c_abstractor options) legitimately leaves the other type's keys behind."""
    for k in sorted(set(raw) - own):
        owners = [
            n
            for n in registry.names()
            if (c := registry[n].config) is not None
            and k in {f.name for f in dataclasses.fields(c)}
        ]
        msg = (
            f"{key}.{k}={raw[k]} is ignored: {key}.type is {name} "
            f"(set {key}.type={' or '.join(owners)} to use it)"
        )
        if msg not in _IGNORED_WARNED:  # configs are re-parsed (ablation cells): warn once
            _IGNORED_WARNED.add(msg)
            log.warning("%s", msg)


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


def family_of_config(m: ModelConfig, prefix: str = "model") -> Any:
    """The `mm1.models.family.ModelFamily` that `m.family` names, with `m`'s components
    resolved (its hooks read them)."""
    entry = FAMILIES.get(m.family)
    if entry is None:
        raise ConfigError(
            f"{prefix}.family={m.family!r} is not a registered model family; "
            f"{FAMILIES.registered()}"
        )
    resolve_components(m, prefix)
    return entry.value


def _validate_encoder(v: VisionConfig, prefix: str) -> None:
    _choice(f"{prefix}.vision.act", v.act, ACTIVATIONS)
    for k in ("width", "layers", "heads", "mlp_dim"):
        _positive(f"{prefix}.vision.{k}", getattr(v, k))
    if v.width % v.heads:
        raise ConfigError(f"{prefix}.vision.width={v.width} is not divisible by heads={v.heads}")
    if not -(v.layers + 1) <= v.feature_layer <= v.layers:
        raise ConfigError(
            f"{prefix}.vision.feature_layer={v.feature_layer} is outside the encoder's "
            f"{v.layers + 1} hidden states (-{v.layers + 1}..{v.layers})"
        )


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    """Checks of the model section; parses the connector and FFN options first
    (`resolve_components`), then lets each validate its own."""
    v, d = m.vision, m.decoder
    family = family_of_config(m, prefix)
    _choice(f"{prefix}.vision.variant", v.variant, VISION_VARIANTS)
    for k in ("image_size", "patch_size"):
        _positive(f"{prefix}.vision.{k}", getattr(v, k))
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"{prefix}.vision.image_size={v.image_size} is not a multiple of "
            f"{prefix}.vision.patch_size={v.patch_size}"
        )
    if family.has_encoder:  # fuyu reads only the image and patch sizes of model.vision
        _validate_encoder(v, prefix)
    family.validate(m, prefix)
    _choice(f"{prefix}.regression_loss", m.regression_loss, REGRESSION_LOSSES)
    if m.regression_loss != REGRESSION_LOSSES[0] and family.image_loss != IMAGE_REGRESSION:
        raise ConfigError(
            f"{prefix}.regression_loss={m.regression_loss}: model.family={m.family} regresses "
            "no image features (model.family=emu2 does)"
        )
    d.ffn.validate(f"{prefix}.decoder.ffn", m)
    _choice(f"{prefix}.decoder.attention", d.attention, ATTENTION_BACKENDS)
    _choice(f"{prefix}.decoder.rope_scaling.type", d.rope_scaling.type, ROPE_TYPES)
    _choice(f"{prefix}.decoder.norm", d.norm, NORM_TYPES)
    for k in ("vocab_size", "dim", "layers", "heads", "kv_heads", "ffn_dim", "max_seq_len"):
        _positive(f"{prefix}.decoder.{k}", getattr(d, k))
    _non_negative(f"{prefix}.decoder.head_dim", d.head_dim, "0 = dim // heads")
    _non_negative(f"{prefix}.decoder.sliding_window", d.sliding_window, "0 = full attention")
    rs = d.rope_scaling
    if rs.type != "default":  # the scaled types divide by these (the default reads none)
        _positive(f"{prefix}.decoder.rope_scaling.factor", rs.factor)
    if rs.type == "llama3":
        _positive(
            f"{prefix}.decoder.rope_scaling.original_max_position_embeddings",
            rs.original_max_position_embeddings,
        )
    if d.heads % d.kv_heads:
        raise ConfigError(
            f"{prefix}.decoder.heads={d.heads} is not a multiple of kv_heads={d.kv_heads}"
        )
    if not d.head_dim and d.dim % d.heads:
        raise ConfigError(f"{prefix}.decoder.dim={d.dim} is not divisible by heads={d.heads}")
    if d.resolved_head_dim % 2:
        raise ConfigError(f"{prefix}.decoder.head_dim must be even for rotary embeddings")
    if not 0 < d.rope_fraction <= 1 or d.rope_dim < 2 or d.rope_dim % 2:
        raise ConfigError(
            f"{prefix}.decoder.rope_fraction={d.rope_fraction} must be in (0, 1] and rotate an "
            f"even number (>= 2) of the head's {d.resolved_head_dim} dimensions "
            f"(it rotates {d.rope_dim})"
        )
    if m.image_token_id >= d.vocab_size:
        raise ConfigError(
            f"{prefix}.image_token_id={m.image_token_id} is outside the vocabulary "
            f"(decoder.vocab_size={d.vocab_size})"
        )
    validate_image_layout(m, prefix)
    _check_finite(m, prefix)


def validate_image_layout(m: ModelConfig, prefix: str = "model") -> None:
    """Checks of `model.image_layout` against the encoder and the connector."""
    lay, key = m.image_layout, f"{prefix}.image_layout"
    _choice(f"{key}.type", lay.type, IMAGE_LAYOUTS)
    _choice(f"{key}.overview", lay.overview, OVERVIEW_PLACES)
    _non_negative(f"{key}.encoder_chunk", lay.encoder_chunk, "0 = all")
    if not 1 <= lay.min_tiles <= lay.max_tiles:
        raise ConfigError(
            f"{key}.min_tiles={lay.min_tiles} and max_tiles={lay.max_tiles} need "
            "1 <= min_tiles <= max_tiles"
        )
    if lay.canvas is not None:
        if lay.type != "fuyu":
            raise ConfigError(
                f"{key}.canvas is Fuyu's canvas, which only the fuyu layout reads "
                f"({key}.type={lay.type})"
            )
        p = m.vision.patch_size
        sides = list(lay.canvas)
        if len(sides) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < p or v % p for v in sides
        ):
            raise ConfigError(
                f"{key}.canvas={sides} must be [height, width] px, each a positive multiple of "
                f"model.vision.patch_size={p}"
            )
    crop = m.vision.image_size
    for i, pair in enumerate(lay.pinpoints or []):
        if len(pair) != 2 or any(v < crop or v % crop for v in pair):
            raise ConfigError(
                f"{key}.pinpoints[{i}]={list(pair)} must be [width, height], each a multiple "
                f"of model.vision.image_size={crop}"
            )
    if lay.grid is not None and (len(lay.grid) != 2 or not 1 <= lay.grid[0] <= lay.grid[1]):
        raise ConfigError(f"{key}.grid={lay.grid} must be [lo, hi] with 1 <= lo <= hi")
    q = m.num_image_tokens
    if lay.type == "anyres" and math.isqrt(q) ** 2 != q:
        raise ConfigError(
            f"{key}.type=anyres assembles each crop's tokens as a square grid, but "
            f"{prefix}.connector gives {q} tokens per crop"
        )


def max_image_tokens(m: ModelConfig) -> int:
    """The most image tokens one image can take under `m.image_layout` (boundaries apart)."""
    lay, q = m.image_layout, m.num_image_tokens
    if lay.type == "mm1":
        return 5 * q
    if lay.type == "dynamic":
        return (lay.max_tiles + (lay.max_tiles > 1)) * q
    if lay.type == "anyres":
        side = math.isqrt(q)
        canvases = canvas_candidates(m.vision.image_size, lay.pinpoints, lay.grid)
        crop = m.vision.image_size
        return q + max((h // crop) * side * ((w // crop) * side + 1) for w, h in canvases)
    return q  # single, and fuyu: the whole canvas at most


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
    for k in ("upcycle_noise", "upcycle_seed"):  # saved before upcycling existed
        init.setdefault(k, getattr(InitConfig, k))
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
    _positive("data.pack_buffer", d.pack_buffer)
    if not 0.0 <= d.max_error_rate <= 1.0:
        raise ConfigError(f"data.max_error_rate={d.max_error_rate} must be within [0, 1]")
    _non_negative("data.max_image_pixels", d.max_image_pixels, "0 = no cap")
    _non_negative("data.max_text_chars", d.max_text_chars, "0 = no cap")
    if not 0 <= d.caption_first <= 1:
        raise ConfigError(f"data.caption_first={d.caption_first} must be a share in [0, 1]")
    # torch's DataLoader refuses a negative count, but deep in training and without the key
    _non_negative("data.num_workers", d.num_workers)
    _choice("data.world_size", d.world_size, ("tiny", "small", "medium"))
    _non_negative("data.world_text_scale", d.world_text_scale)
    if d.world_image_size < 32:
        raise ConfigError(f"data.world_image_size={d.world_image_size} must be at least 32 pixels")
    for key, sources in (("data.sources", d.sources), ("data.val_sources", d.val_sources)):
        named: dict[str, int] = {}
        for i, s in enumerate(sources):
            _choice(f"{key}[{i}].format", s.format, SOURCE_FORMATS)
            if s.name and not SOURCE_NAME.fullmatch(s.name):
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
            if not (math.isfinite(s.weight) and s.weight >= 0):
                raise ConfigError(f"{key}[{i}].weight={s.weight} must be a finite number >= 0")
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
    n_img = max_image_tokens(cfg.model) + 2 * bool(d.image_boundaries)  # <img> slots </img>
    if n_img >= d.seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} cannot hold one image of {n_img} tokens "
            "(the image tokens: model.connector.num_tokens, or model.vision.patch_size for "
            "fuyu; model.image_layout, data.image_boundaries)"
        )
    for k in ("weights", *INIT_PARTS):
        value = getattr(t.init, k)
        if value is not None and not value.strip():
            raise ConfigError(f"train.init.{k} is empty: name a directory, or leave it unset")
    _choice("train.parallel", t.parallel, ("fsdp", "ddp", "none"))
    _choice("train.dtype", t.dtype, ("auto", "float32", "bfloat16"))
    _choice("train.wandb", t.wandb, ("off", "offline", "online"))
    for k in (
        "steps",
        "batch_size",
        "micro_batch_size",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "profile_steps",
        # 0 would abort at the first skipped step all the same: not "never abort"
        "max_nonfinite_in_a_row",
    ):
        _positive(f"train.{k}", getattr(t, k))
    # `step % val_every == 0` is true at every step for a negative value
    _non_negative("train.val_every", t.val_every, "0 = no validation")
    _non_negative("train.val_batches", t.val_batches)
    _non_negative("train.shard_size", t.shard_size, "0 = shard over every process")
    if t.shard_size == 1:
        raise ConfigError(
            "train.shard_size=1 would keep the whole model on every process: that is "
            "train.parallel=ddp (0 shards over every process)"
        )
    if t.shard_size and t.parallel != "fsdp":
        raise ConfigError(
            f"train.shard_size={t.shard_size} sets FSDP2's shard groups: it needs "
            f"train.parallel=fsdp (not {t.parallel})"
        )
    _non_negative("train.profile_at", t.profile_at, "0 = no profiling")
    if t.profile_steps > PROFILE_MAX_STEPS:
        raise ConfigError(
            f"train.profile_steps={t.profile_steps}: at most {PROFILE_MAX_STEPS} (a trace takes "
            "tens of MB per step of a real model, and minutes to write)"
        )
    _non_negative("train.optim.warmup_steps", t.optim.warmup_steps, "0 = no warmup")
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
    if not (math.isfinite(t.init.upcycle_noise) and t.init.upcycle_noise >= 0):
        raise ConfigError(
            f"train.init.upcycle_noise={t.init.upcycle_noise} must be a finite number >= 0"
        )
    for name, w in t.aux_loss_weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"train.aux_loss_weights.{name}={w} must be a finite number >= 0")
    if not (math.isfinite(t.z_loss) and t.z_loss >= 0):
        raise ConfigError(f"train.z_loss={t.z_loss} must be a finite number >= 0 (0 = off)")
    if LOGIT_Z in t.aux_loss_weights:
        raise ConfigError(
            f"train.aux_loss_weights.{LOGIT_Z}: the output z-loss is weighted by train.z_loss"
        )
    if not 0 <= t.optim.min_lr_ratio <= 1:
        raise ConfigError(f"train.optim.min_lr_ratio={t.optim.min_lr_ratio} must be in [0, 1]")
    _validate_lora(t)
    validate_eval(cfg.eval)
    # Last, so that the specific checks above keep their messages; the whole tree, so that a
    # section of an extended schema (an encoder run's `encoder`) is covered too.
    _check_finite(cfg, "")


def _validate_lora(t: TrainConfig) -> None:
    lora = t.lora
    _non_negative("train.lora.rank", lora.rank, "0 = no LoRA")
    _choice("train.lora.quantize", lora.quantize, LORA_QUANTIZE)
    if not lora.rank:
        if lora.quantize != "none":
            raise ConfigError(
                f"train.lora.quantize={lora.quantize} quantizes the weights LoRA adapts, and "
                "train.lora.rank=0 turns LoRA off: set a rank (e.g. 16)"
            )
        return
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise ConfigError(f"train.lora.alpha={lora.alpha} must be a finite number > 0")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"train.lora.dropout={lora.dropout} must be in [0, 1)")
    unknown = [x for x in lora.targets if x not in LORA_TARGETS]
    if unknown or not lora.targets:
        raise ConfigError(
            f"train.lora.targets={list(lora.targets)}: name some of {', '.join(LORA_TARGETS)} "
            "(the decoder blocks' linear layers)"
        )
    if not t.train_decoder:
        raise ConfigError(
            "train.lora.rank > 0 trains the decoder through its adapters, and "
            "train.train_decoder=false freezes the decoder: set one of them back"
        )


def validate_eval(e: EvalConfig) -> None:
    if not e.shots:
        raise ConfigError("eval.shots is empty: give shot counts like [0, 4, 8]")
    for i, s in enumerate(e.shots):
        _non_negative(f"eval.shots[{i}]", s)
        if s in e.shots[:i]:  # the same scores twice, and a report table with a repeated row
            raise ConfigError(f"eval.shots[{i}]={s} is given twice: list each shot count once")
    for k in ("seeds", "max_new_tokens", "vqa_max_new_tokens", "num_beams", "batch_size"):
        _positive(f"eval.{k}", getattr(e, k))
    if e.compile and e.num_beams > 1:
        raise ConfigError(
            f"eval.compile compiles greedy decoding, but eval.num_beams={e.num_beams} runs beam "
            "search: set eval.num_beams=1 or eval.compile=false"
        )
    _choice("eval.demo_selection", e.demo_selection, DEMO_SELECTIONS)
    _choice("eval.bad_images", e.bad_images, BAD_IMAGE_POLICIES)
    _non_negative("eval.high_res_last", e.high_res_last, "0 = every image")
    _non_negative("eval.max_examples", e.max_examples, "0 = every query")
    _check_finite(e, "eval")
