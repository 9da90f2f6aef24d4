"""Reading configs: YAML files with `extends`, dotted command-line overrides, OmegaConf errors
turned into one line naming the key; and writing them back (`to_dict`, `to_yaml`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mm1.config.schema import (
    LORA_TARGETS,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    SourceConfig,
    TrainConfig,
)
from mm1.config.validation import (
    apply_deprecated_keys,
    structured_schema,
    validate,
    validate_eval,
    validate_model,
)

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
        # an `extends` is relative to the file naming it (a copied config loses its parents)
        where = "" if shown == str(path) else f"; looked for at {path}"
        raise ConfigError(f"config file not found: {shown}{where}")
    try:
        raw = OmegaConf.load(real)
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{shown}: the top level must be a mapping of sections")
    parents = raw.pop(EXTENDS_KEY, None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, (list, ListConfig)) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(
            f"{shown}: '{EXTENDS_KEY}' must be a config file or a list of them, not {parents!r}"
        )
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


def _unoptional(hint: Any) -> Any:
    """`X | None` -> X (None is left to OmegaConf to accept or refuse)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if type(None) in get_args(hint) and len(args) == 1 else hint


def _whole_list(key: str, index: dict[str, Any], current: Any) -> str:
    """An example `key=[...]` for a list element override (`index`: position -> value): the list
    as it stands with those elements replaced, where it holds plain values."""
    plain = all(not isinstance(v, (dict, list)) for v in index.values())
    if isinstance(current, (list, tuple)) and plain and all(int(i) < len(current) for i in index):
        new = [index.get(str(i), v) for i, v in enumerate(current)]
        return f"{key}=[{','.join(str(v) for v in new)}]"
    return f"{key}=[{{...}},...]" if not plain else f"{key}=[...]"


def _check_shapes(
    raw: Any, schema: type, where: str, current: Any, dotted: bool, prefix: str = ""
) -> None:
    """Name the key of a value of the wrong shape (`train.optim=5`, `eval.shots.0=3`): OmegaConf
    reports these without a key, or with the wrong one. `current`: the config `raw` merges into
    (plain containers), for an example; `dotted`: `raw` is a command-line override."""
    if not isinstance(raw, dict):
        return
    hints = get_type_hints(schema)
    for f in fields(schema):
        if raw.get(f.name) is None:
            continue  # absent, or null: OmegaConf accepts or refuses that by itself
        value, key = raw[f.name], f"{prefix}{f.name}"
        hint = _unoptional(hints[f.name])
        now = current.get(f.name) if isinstance(current, dict) else None
        if is_dataclass(hint) or get_origin(hint) is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} is a mapping of keys, not {value!r}")
            if is_dataclass(hint):
                _check_shapes(value, hint, where, now, dotted, f"{key}.")  # type: ignore[arg-type]
        elif get_origin(hint) in (list, tuple):
            if dotted and isinstance(value, dict) and all(str(k).isdigit() for k in value):
                # `key.0=v`: OmegaConf's dotlist makes a mapping {"0": v}, which no list takes
                raise ConfigError(
                    f"{where}: {key} is a list, and an override cannot set one element of it; "
                    f"give the whole list, e.g. {_whole_list(key, value, now)}"
                )
            if not isinstance(value, list):
                got = "a mapping" if isinstance(value, dict) else repr(value)
                each = " (entries: - {format: ..., path: ...})" if key.endswith("sources") else ""
                raise ConfigError(f"{where}: {key} is a list, not {got}{each}")
            item = get_args(hint)[0] if get_args(hint) else None
            for i, entry in enumerate(value if is_dataclass(item) else []):
                if not isinstance(entry, dict):
                    raise ConfigError(f"{where}: {key}[{i}] is a mapping of keys, not {entry!r}")


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


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema_type: type[Config] = Config,
) -> Config:
    """Load a YAML config (with `extends`), apply `section.key=value` overrides, validate.
    `schema_type` is Config or an extension of it with sections of its own (an encoder run's)."""
    schema = structured_schema(schema_type)
    merged = schema
    if path is not None:
        try:
            raw = _read_yaml(Path(path))
            _check_source_keys(raw, str(path))
            plain = OmegaConf.to_container(raw)
            _check_shapes(plain, schema_type, str(path), None, dotted=False)
            _check_fixed_tuples(plain, schema_type, str(path))
            merged = OmegaConf.merge(merged, raw)
        except OmegaConfBaseException as err:
            raise _friendly(err) from None
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:  # e.g. a mapping where the schema has a list
            raise ConfigError(f"{path}: {err} (a list written as a mapping?)") from None
    if overrides:
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not of the form section.key=value")
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
            _check_source_keys(dotlist, "the command line")
            _check_fixed_tuples(OmegaConf.to_container(dotlist), schema_type, "the command line")
        except OmegaConfBaseException as err:
            raise _friendly(err) from None
        try:  # all at once: one merge (a merge copies the whole config)
            cfg = _to_config(OmegaConf.merge(merged, dotlist))
        except (OmegaConfBaseException, TypeError, ValueError) as err:
            # again one at a time, which names the override that caused it
            _name_the_override(merged, overrides, schema_type)
            if isinstance(err, OmegaConfBaseException):
                raise _friendly(err) from None
            raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from None
    else:
        cfg = _to_config(merged)
    apply_deprecated_keys(cfg)
    validate(cfg)
    return cfg


def _to_config(merged: Any) -> Config:
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _friendly(err) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _name_the_override(merged: Any, overrides: list[str], schema_type: type) -> None:
    """Merge `overrides` into `merged` one at a time, checking each one's shape; a ConfigError
    naming the first that fails (OmegaConf names the key only sometimes, and never the
    override). Returns when none does on its own."""
    for o in overrides:
        try:
            one = OmegaConf.from_dotlist([o])
            current = OmegaConf.to_container(merged)
            where = f"override {o}"
            _check_shapes(OmegaConf.to_container(one), schema_type, where, current, True)
            merged = OmegaConf.merge(merged, one)
        except OmegaConfBaseException as err:
            friendly = _friendly(err)
            named = getattr(err, "full_key", None)
            raise friendly if named else ConfigError(f"override {o}: {friendly}") from None
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"override {o}: {err}") from None


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build and validate a ModelConfig from a plain dict (e.g. an exported config.json)."""
    try:
        merged = OmegaConf.merge(structured_schema(ModelConfig), OmegaConf.create(d))
        m: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _friendly(err) from None
    validate_model(m)
    return m


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of any config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# Keys added to the schema after configs were saved with it: dotted key ("section.key", or
# deeper into a mapping) -> its default.
# At that default a key is left out of `config_identity`, so a study written before it keeps
# its fingerprint and its cells their hashes; a run saved before it resumes with whatever the
# config now says (`train.config_change.current_shape`).
ADDED_KEYS: dict[str, Any] = {
    "data.max_text_chars": DataConfig.max_text_chars,
    "train.profile_at": TrainConfig.profile_at,
    "train.profile_steps": TrainConfig.profile_steps,
    "train.shard_size": TrainConfig.shard_size,
    "data.caption_first": DataConfig.caption_first,
    "model.regression_loss": "l1",
    "train.aux_loss_weights.image_regression": 1.0,
    "train.aux_loss_weights.image_codes": 1.0,
    "model.vq": {"channels": [32, 64, 128, 128], "codebook_size": 1024, "code_dim": 32},
    "model.seed": {
        "num_queries": 32,
        "layers": 2,
        "decoder_layers": 2,
        "codebook_size": 1024,
        "code_dim": 32,
        "embed_dim": 128,
    },
    "train.lora": {
        "rank": 0,
        "alpha": 16.0,
        "dropout": 0.0,
        "targets": list(LORA_TARGETS),
        "quantize": "none",
    },
    "train.lora.quantize": "none",
}


def config_identity(cfg: Any) -> dict[str, Any]:
    """A config as fingerprints hash it: `to_dict` without `train.run_dir`, and without the
    keys added since studies were written (`ADDED_KEYS`) where they hold their defaults. Every
    other value counts, defaults included: a changed default changes what a run means."""
    d = to_dict(cfg)
    d.get("train", {}).pop("run_dir", None)
    for key, default in ADDED_KEYS.items():
        holder, name = key_holder(d, key)
        if name in holder and holder[name] == default:
            del holder[name]
    return d


def key_holder(d: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The mapping of a nested dict that holds dotted `key`, and the key's last part (an empty
    mapping where a section on the way is missing or not a mapping)."""
    *path, name = key.split(".")
    for part in path:
        d = d.get(part) if isinstance(d.get(part), dict) else {}
    return d, name


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_eval_config(saved: str | Path | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    """The `eval` section of a run's saved config (the defaults without one), then `eval.*`
    overrides; validated. `mm1 eval RUN` scores a run with the settings its own report used."""
    bad = [o for o in overrides if "=" not in o or not o.startswith("eval.")]
    if bad:
        known = ", ".join(EvalConfig.__dataclass_fields__)
        raise ConfigError(f"override {bad[0]!r}: give eval.KEY=VALUE, KEY one of {known}")
    merged = structured_schema(Config)
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
