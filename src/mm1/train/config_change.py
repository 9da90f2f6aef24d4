"""What a resume may change: a run's saved config against the one it is resumed with.

Keys that change what the run means (the model, the data, batch sizes, seed, starting point)
are refused unless `--force`; keys under them that only change how the same function is
computed (the attention kernel, the expert matmul) may change freely; everything else (steps,
logging, the optimizer's settings, which a resume re-applies) is not compared.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from mm1.checkpoint import latest_checkpoint
from mm1.config import (
    Config,
    ConfigError,
    SourceConfig,
    deprecated_keys_in_dict,
    to_dict,
)

MEANING_KEYS = (
    "model",
    "data",
    "train.batch_size",
    "train.micro_batch_size",
    "train.seed",
    "train.init",
)
IMPLEMENTATION_KEYS = ("model.decoder.attention", "model.decoder.ffn.expert_matmul")


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


def meaningful(keys: list[str]) -> list[str]:
    """The keys among `keys` whose change would change what a resumed run means."""

    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == m or key.startswith(m + ".") for m in prefixes)

    return [k for k in keys if under(k, MEANING_KEYS) and not under(k, IMPLEMENTATION_KEYS)]


def saved_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The saved config.yaml of a run that has a checkpoint to resume, else None."""
    saved = run_dir / "config.yaml"
    if not saved.exists() or latest_checkpoint(run_dir) is None:
        return None
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    return old if isinstance(old, dict) else None  # type: ignore[return-value]


def refuse_changes(run_dir: Path, changed: list[str], force: bool) -> None:
    if changed and not force:
        raise ConfigError(
            f"{run_dir} holds a run whose config differs in {', '.join(changed)}; "
            "resuming would change its meaning. Use a new train.run_dir, or --force."
        )


def check_resumed_config(run_dir: Path, cfg: Config, force: bool) -> None:
    """Refuse resuming `run_dir` with a config whose meaning differs from its saved one (unless
    `force`), and a changed loader worker count in any case."""
    old = saved_run_config(run_dir)
    if old is None:
        return
    deprecated_keys_in_dict(old)  # a run saved before train.init
    old = current_shape(old)  # a run saved before the registries
    changed = meaningful(config_diff(old, to_dict(cfg)))
    if "data.num_workers" in changed:  # not even under --force: torchdata would fail deep
        was = old["data"]["num_workers"]
        raise ConfigError(
            f"data.num_workers={cfg.data.num_workers}: {run_dir} was saved with "
            f"data.num_workers={was}, and the data loader's position is kept per worker; "
            f"resume with data.num_workers={was}"
        )
    refuse_changes(run_dir, changed, force)


def current_shape(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config in today's shape, so an unchanged run still resumes: its model section
    read anew (older runs wrote every connector option side by side and the FFN as a name), and
    source keys added since (`name`) at their defaults."""
    from mm1.config import model_config_from_dict

    model = saved.get("model")
    if isinstance(model, dict):
        # Unreadable today: compared as written, so the changed keys are reported.
        with contextlib.suppress(ConfigError):
            saved = {**saved, "model": to_dict(model_config_from_dict(model))}
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
