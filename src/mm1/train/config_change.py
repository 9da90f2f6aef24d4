"""What a resume may change: a run's saved config against the one it is resumed with.

Keys that change what the run means (the model, the data, batch sizes, seed, starting point)
are refused unless `--force`; those that set the model's parameters (`MODEL_KEYS`), and a run
of the other trainer (MM1 / image encoder), are refused even then: the checkpoint could not
load. Keys under them that only change how the same function is computed (the attention
kernel, the expert matmul) may change freely; everything else (steps, logging, the optimizer's
settings, which a resume re-applies) is not compared.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

from mm1.checkpoint import latest_checkpoint, read_meta, read_model_config
from mm1.config import (
    ADDED_KEYS,
    Config,
    ConfigError,
    ModelConfig,
    SourceConfig,
    deprecated_keys_in_dict,
    to_dict,
)
from mm1.config.loading import key_holder

MEANING_KEYS = (
    "model",
    "data",
    "train.batch_size",
    "train.micro_batch_size",
    "train.seed",
    "train.init",
)
IMPLEMENTATION_KEYS = ("model.decoder.attention", "model.decoder.ffn.expert_matmul")
# Keys that set the model's parameters (their names or shapes): a checkpoint cannot load into
# another such model, so not even `--force` lets a resume change them. Not the vocabulary (the
# tokenizer's, `data.tokenizer`) nor activations, norms' eps or RoPE, which a forced resume
# may change (a context extension).
MODEL_KEYS = (
    "model.family",
    *(
        f"model.vision.{k}"
        for k in (
            "variant",
            "image_size",
            "patch_size",
            "width",
            "layers",
            "heads",
            "mlp_dim",
            "feature_layer",  # only the blocks up to it exist
        )
    ),
    "model.connector",
    *(
        f"model.decoder.{k}"
        for k in (
            "dim",
            "layers",
            "heads",
            "kv_heads",
            "head_dim",
            "ffn_dim",
            "ffn.type",
            "ffn.experts",
            "ffn.every",
            "ffn.expert_dim",
            "ffn.bias",
            "qk_norm",
            "qkv_bias",
            "o_bias",
            "norm",  # LayerNorm has a bias, RMSNorm none
            "tie_embeddings",
        )
    ),
    *(f"model.vq.{k}" for k in ("channels", "codebook_size", "code_dim")),
    *(
        f"model.seed.{k}"
        for k in ("num_queries", "layers", "decoder_layers", "codebook_size", "code_dim")
    ),
    "model.seed.embed_dim",
    "encoder.objective",
)
# What a family without an image encoder (fuyu) does not build: its parameters are the
# patches' Linear (set by the patch size alone) and the decoder's.
ENCODER_ONLY_KEYS = (
    *(f"model.vision.{k}" for k in ("variant", "width", "layers", "heads", "mlp_dim")),
    "model.vision.feature_layer",
    "model.connector",
)
TEXT_TOWER_KEYS = (
    *(f"encoder.text.{k}" for k in ("width", "layers", "heads", "mlp_dim", "max_len")),
    "encoder.text.hf",  # whether set: an HF tower's parameters are named its way
)
# An encoder run's objective-specific parts: only the objective's own count.
ENCODER_MODEL_KEYS = {
    "clip": (*TEXT_TOWER_KEYS, "encoder.clip.embed_dim"),
    "aim": ("encoder.aim.head_dim", "encoder.aim.head_layers"),
    # SEED's text tower is its CLIP run's (frozen); its joint space is `model.seed.embed_dim`.
    "seed": TEXT_TOWER_KEYS,
}


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for k in keys:
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in prefixes)


def meaningful(keys: list[str]) -> list[str]:
    """The keys among `keys` whose change would change what a resumed run means."""
    return [k for k in keys if _under(k, MEANING_KEYS) and not _under(k, IMPLEMENTATION_KEYS)]


def saved_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The saved config of a run that has a checkpoint to resume, else None: its config.yaml
    (rewritten at each start, so a change --force let through is kept), or, that file gone
    or emptied, the config its newest checkpoint was saved with (every resume check would
    otherwise be skipped)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    saved = run_dir / "config.yaml"
    if saved.exists():
        from omegaconf import OmegaConf

        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        if isinstance(old, dict):
            return old  # type: ignore[return-value]
    old = read_meta(latest).get("config")
    return old if isinstance(old, dict) else None


def _value(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None  # type: ignore[assignment]
    return config


def model_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each changed key that sets the model's parameters
    (`MODEL_KEYS`; for an encoder run also its objective's own, `ENCODER_MODEL_KEYS`)."""
    keys = list(MODEL_KEYS)
    if "encoder" in old and _value(old, "encoder.objective") == _value(new, "encoder.objective"):
        keys += ENCODER_MODEL_KEYS.get(str(_value(new, "encoder.objective")), ())
    unused = unused_keys(old, new)
    out = []
    for key in [k for k in config_diff(old, new) if _under(k, tuple(keys))]:
        if _under(key, unused):
            continue
        a, b = _value(old, key), _value(new, key)
        if key == "encoder.text.hf" and (a is None) == (b is None):
            continue  # another path to a tower: its shapes are checked when it loads
        out.append((key, a, b))
    return out


def unused_keys(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, ...]:
    """Model keys the run's family does not read (a fuyu run's encoder and connector, the
    image tokenizers of the families that do not read with them; a VQ tokenizer run's ViT and
    connector, a SEED tokenizer run's connector), which a resume may change freely; none when
    the family itself changes."""
    from mm1.registry import FAMILIES

    family = _value(new, "model.family")
    entry = FAMILIES.get(str(family)) if family == _value(old, "model.family") else None
    if entry is None:
        return ()
    tokenizers = {"vq": "model.vq", "seed": "model.seed"}
    objective = _value(old, "encoder.objective")
    if objective in tokenizers:  # a tokenizer run trains its model.vq / model.seed alone
        unused = ENCODER_ONLY_KEYS if objective == "vq" else ("model.connector",)
        return (*unused, *(v for k, v in tokenizers.items() if k != objective))
    spec = entry.value
    unused = () if spec.has_encoder else ENCODER_ONLY_KEYS
    if spec.image_tokenizer == "seed":  # the Q-Former's codes are the tokens: no connector
        unused = ("model.connector",)
    read = () if "encoder" in old else (tokenizers.get(spec.image_tokenizer),)
    return (*unused, *(v for v in tokenizers.values() if v not in read))


def _saved_against_config(changes: list[tuple[str, Any, Any]]) -> str:
    """ "the checkpoint's KEY is A, the config's B; ..." for (key, saved, new) changes."""
    return "; ".join(f"the checkpoint's {k} is {a}, the config's {b}" for k, a, b in changes)


def refuse_model_change(
    run_dir: Path, old: dict[str, Any], new: dict[str, Any], force: bool
) -> None:
    """Refuse, even with `force`, a resume whose model differs from the checkpoint's: its
    weights could not load (DCP's "Missing key in checkpoint state_dict", which reads as a
    corrupt checkpoint)."""
    changes = model_changes(old, new)
    if not changes:
        return
    what = _saved_against_config(changes)
    head = "--force cannot change the model" if force else f"{run_dir} holds another model"
    raise ConfigError(f"{head}: {what}; resume with the same model or choose a new train.run_dir")


# Keys added since older runs were saved whose values add parameters (LoRA's adapters).
ADDED_PARAMETER_KEYS = ("train.lora", "train.lora.quantize")

# Which parts train: each trained parameter has optimizer state (and its parameter group) in
# the checkpoint, so a resume that trains other parts could not load it. LoRA's adapters are
# parameters of the checkpoint too (their shapes, and the scale they were trained under).
TRAINED_PARTS_KEYS = (
    "train.train_vision",
    "train.train_connector",
    "train.train_decoder",
    "train.lora.rank",
    "train.lora.alpha",
    "train.lora.targets",
    "train.lora.quantize",
)


def refuse_trained_parts_change(run_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse, even with `--force`, a resume that trains other parts than the checkpoint did
    (its optimizer's state and groups are those parts'); a family whose image tokenizer is
    always frozen reads no `train.train_vision`."""
    from mm1.registry import FAMILIES

    keys = list(TRAINED_PARTS_KEYS)
    entry = FAMILIES.get(str(_value(new, "model.family")))
    if entry is not None and entry.value.image_tokenizer:
        keys.remove("train.train_vision")
    changes = [(k, _value(old, k), _value(new, k)) for k in keys]
    changes = [(k, a, b) for k, a, b in changes if a is not None and a != b]
    if not changes:
        return
    what = _saved_against_config(changes)
    raise ConfigError(
        f"a resume cannot change what trains, not even with --force: {what} (the optimizer's "
        f"state is the trained parts'). Resume with the saved value, or start a new stage from "
        f"this run: train.init.weights={run_dir} and a new train.run_dir"
    )


def refuse_other_run_kind(run_dir: Path, old: dict[str, Any], cfg: Config) -> None:
    """Refuse resuming an image-encoder run (its saved config has an `encoder` section) with
    `mm1 train`, or an MM1 run with `mm1 train-encoder`: one model's checkpoint is no start for
    the other, and listing their differing keys would not say so."""
    from mm1.config.encoder import EncoderRunConfig

    encoder_run, encoder_config = "encoder" in old, isinstance(cfg, EncoderRunConfig)
    if encoder_run == encoder_config:
        return
    mm1, encoder = "an MM1 model run (mm1 train)", "an image-encoder run (mm1 train-encoder)"
    it, other, command = (
        (encoder, mm1, "mm1 train-encoder") if encoder_run else (mm1, encoder, "mm1 train")
    )
    raise ConfigError(
        f"train.run_dir={run_dir} is {it}, not {other}: resume it with {command}, or choose a "
        "new train.run_dir"
    )


# What a changed key alters, where that is less than the run's meaning (said in the refusal).
CHANGE_NOTES = {
    "train.micro_batch_size": "train.micro_batch_size only splits each step's batch differently "
    "for an MM1 run (with data.num_workers > 1 the workers' rows also interleave differently), "
    "but its validation rows (train.val_batches x train.micro_batch_size) change with it, so "
    "val_loss before and after the resume is measured on other rows",
}


def refuse_changes(run_dir: Path, changed: list[str], force: bool, encoder: bool = False) -> None:
    """Refuse a resume whose meaning changed (`changed`: the meaningful keys) unless `force`.
    An encoder run's micro-batch is its contrastive batch: no note softens that change."""
    if changed and not force:
        notes = [] if encoder else [CHANGE_NOTES[k] for k in changed if k in CHANGE_NOTES]
        said = "".join(f" ({n})" for n in notes)
        raise ConfigError(
            f"{run_dir} holds a run whose config differs in {', '.join(changed)}; "
            f"resuming would change its meaning{said}. Use a new train.run_dir, or --force."
        )


def check_resumed_config(
    run_dir: Path, cfg: Config, force: bool, resharding: bool = False
) -> list[str]:
    """Refuse resuming `run_dir` with a config whose meaning differs from its saved one (unless
    `force`), and in any case a run of the other trainer (MM1 / image encoder), another model
    (an encoder run's `encoder` section included) or a changed loader worker count (except
    `resharding`: onto another number of processes, no loader position is restored). Returns
    what `force` let change, `key old -> new` each, for the log."""
    old = saved_run_config(run_dir)
    if old is None:
        return []
    refuse_other_run_kind(run_dir, old, cfg)
    deprecated_keys_in_dict(old)  # a run saved before train.init
    new = to_dict(cfg)
    old = current_shape(old, new)  # a run saved before the registries, or before a key
    unused = unused_keys(old, new)
    changed = [k for k in meaningful(config_diff(old, new)) if not _under(k, unused)]
    if resharding:  # the loaders start afresh in a new shuffle: any worker count will do
        changed = [k for k in changed if k != "data.num_workers"]
    if "data.num_workers" in changed:  # not even under --force: torchdata would fail deep
        was = old["data"]["num_workers"]
        raise ConfigError(
            f"data.num_workers={cfg.data.num_workers}: {run_dir} was saved with "
            f"data.num_workers={was}, and the data loader's position is kept per worker; "
            f"resume with data.num_workers={was}"
        )
    refuse_model_change(run_dir, old, new, force)  # before the keys --force may change
    refuse_trained_parts_change(run_dir, old, new)
    refuse_changes(run_dir, changed, force, encoder="encoder" in old)
    return [f"{k} {_short(_value(old, k))} -> {_short(_value(new, k))}" for k in changed]


def _short(value: Any, width: int = 60) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def current_shape(saved: dict[str, Any], new: dict[str, Any] | None = None) -> dict[str, Any]:
    """A saved run config in today's shape, so an unchanged run still resumes: its model section
    read anew (older runs wrote every connector option side by side and the FFN as a name),
    sources' `name` at its default, and each key added since it was saved (`ADDED_KEYS`) as the
    config `new` it resumes with has it (its default without one): the run never chose one."""
    from mm1.config import model_config_from_dict

    model = saved.get("model")
    if isinstance(model, dict):
        # Unreadable today: compared as written, so the changed keys are reported.
        with contextlib.suppress(ConfigError):
            saved = {**saved, "model": to_dict(model_config_from_dict(model))}
    saved = copy.deepcopy(saved)
    for key, default in ADDED_KEYS.items():
        part, name = key_holder(saved, key)
        if part and name not in part:
            now, _ = key_holder(new or {}, key)
            # A key that adds parameters was off in the run: its default, so turning it on at
            # a resume is refused (the checkpoint has no such parameters).
            part[name] = default if key in ADDED_PARAMETER_KEYS else now.get(name, default)
    data = saved.get("data")
    if isinstance(data, dict):
        defaults = {"name": SourceConfig.name}
        data = {
            **data,
            **{
                k: [{**defaults, **s} if isinstance(s, dict) else s for s in data[k]]
                for k in ("sources", "val_sources")
                if isinstance(data.get(k), list)
            },
        }
        saved = {**saved, "data": data}
    return saved


def own_model_config(configured: ModelConfig, run_dir: Path) -> ModelConfig:
    """A resumed run's architecture (its `model.json`), computed as configured now: attention's
    backend and the encoder's chunking are not part of the weights (as for a starting point)."""
    own = read_model_config(run_dir)
    own.decoder.attention = configured.decoder.attention
    own.image_layout.encoder_chunk = configured.image_layout.encoder_chunk
    return own
