"""Reading saved mm1 models, below both training and inference: run checkpoints (DCP, read
safely) and exported directories.

A run directory keeps its checkpoints under ``RUN_DIR/checkpoints/step_N/`` (complete when it
has ``meta.json``; see `mm1.train.checkpoint` for how they are written). Reading never runs code
a checkpoint carries: every pickle in it is read with an allow-list (`mm1.safe_dcp`), and
anything outside it is refused with a `CheckpointError` naming the file.

An exported directory holds ``model.safetensors`` (a tied head stored once) and ``model.json``
(the ModelConfig the weights belong to); `mm1.pretrained` adds the tokenizer and processor.

`read_model_weights` gives the full state dict of any of them (run, checkpoint step, export)
without building a model: training starts from it (`train.init`), inference loads it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mm1.checksums import find_damage
from mm1.config import ConfigError, ModelConfig, model_config_from_dict
from mm1.fs import DamagedFile, read_json
from mm1.safe_dcp import (
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    safe_dcp_load,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKSUMS",
    "EXPORT_WEIGHTS",
    "META_FILE",
    "MODEL_CONFIG",
    "CheckpointError",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "SavedModel",
    "foreign_entries",
    "is_export",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "read_meta",
    "read_model_config",
    "read_model_weights",
    "refuse_encoder_run",
    "refuse_mm1_run",
    "saved_run_kind",
    "verify_checksums",
]

CHECKPOINTS_DIR = "checkpoints"
META_FILE = "meta.json"
FORMAT_VERSION = 1
EXPORT_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"  # in exports and run directories

# meta.json's record of every file the save wrote: {name: {"size": bytes, "crc32": hex}}. DCP
# checks none of its data: a flipped bit in a tensor would load silently.
CHECKSUMS = "checksums"

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp_"
REPLACED = "replaced_"

# Sharded (not gathered) state dicts: each rank handles only its own shards. The optimizer state
# is flattened to "state.<param fqn>.<name>" / "param_groups.<param fqn>.<name>", so it is keyed
# by parameter name only (independent of how parameters are split into groups).
SD_OPTIONS = StateDictOptions(
    full_state_dict=False,
    cpu_offload=False,
    strict=True,
    flatten_optimizer_state_dict=True,
)


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoints_root(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_of(path: Path) -> int | None:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints of a run (``step_N`` directories with ``meta.json``), oldest
    step first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        step = step_of(p)
        if step is not None and p.is_dir() and (p / META_FILE).is_file():
            found[step] = p
    for step, p in orphaned_replacements(root):  # complete; see `orphaned_replacements`
        found.setdefault(step, p)
    return [found[step] for step in sorted(found)]


def foreign_entries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Entries of ``RUN/checkpoints/`` named like a checkpoint (``step_N``) that are not one: a
    file, or a directory without ``meta.json``. mm1 never leaves one (a save is renamed into
    place complete), and a save of step N would replace it, so training refuses to start."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None]
    return sorted((p for p in found if not (p / META_FILE).is_file()), key=step_of)


def orphaned_replacements(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints set aside while a save of the same step replaced them, whose
    replacement never got its final name (a crash between the two renames)."""
    out = []
    for p in root.iterdir():
        name = p.name.removeprefix(TMP_PREFIX + REPLACED)
        step = step_of(Path(name)) if name != p.name else None
        if step is not None and (p / META_FILE).is_file() and not (root / name).exists():
            out.append((step, p))
    return out


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory; FileNotFoundError if it is not complete."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {META_FILE}); "
            "use latest_checkpoint(run_dir) to find one"
        )
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a JSON object")
    return meta


def dist_info() -> tuple[int, int, bool]:
    """(rank, world size, distributed?)"""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


# ---------------------------------------------------------------------------------------------
# Checksums


def verify_checksums(path: Path, distributed: bool) -> None:
    """Refuse a checkpoint whose files differ from what its save recorded in meta.json (a
    bit flipped on disk, a file cut short or replaced in a copy); collective when `distributed`
    (the ranks share the reading and all raise if any finds damage). A checkpoint saved before
    checksums were recorded is read unchecked."""
    sums = read_meta(path).get(CHECKSUMS)
    if not isinstance(sums, dict):
        return
    rank, world, _ = dist_info() if distributed else (0, 1, False)
    problem = find_damage(path, sums, rank, world)
    if distributed:
        found: list[str | None] = [None] * world
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    if problem:
        raise CheckpointError(
            f"{path} is damaged: {problem}. Its weights cannot be trusted; to resume a run from "
            "the checkpoint before it, move this one out of checkpoints/"
        )


# ---------------------------------------------------------------------------------------------
# Model weights


def load_model_weights(path: str | os.PathLike[str], model: nn.Module) -> int:
    """Load only the model of a checkpoint, into a model on any number of processes (one, for
    inference: DCP reshards whatever the saving world size was). Returns the checkpoint's step."""
    path = Path(path)
    meta = read_meta(path)
    _, _, distributed = dist_info()
    verify_checksums(path, distributed)
    model_sd, _ = get_state_dict(model, (), options=SD_OPTIONS)
    state: dict[str, Any] = {"model": model_sd}
    safe_dcp_load(state, path, distributed)
    set_state_dict(
        model, (), model_state_dict=state["model"], optim_state_dict={}, options=SD_OPTIONS
    )
    return int(meta["step"])


@dataclass
class SavedModel:
    """A saved model's full (unsharded, CPU) weights, our parameter names, a tied head omitted."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    path: Path  # the checkpoint step directory or the exported directory read
    step: int | None  # the checkpoint's step; None for an export


def is_export(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / EXPORT_WEIGHTS).is_file() and (p / MODEL_CONFIG).is_file()


def is_run(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / CHECKPOINTS_DIR).is_dir() and (p / MODEL_CONFIG).is_file()


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A complete ``step_N`` directory inside a run directory."""
    p = Path(path)
    return (p / META_FILE).is_file() and is_run(p.parent.parent)


def _saved_run_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's (or its checkpoint's run's) saved config.yaml as a dict, if readable."""
    import yaml

    p = Path(path)
    run = p.parent.parent if is_checkpoint(p) else p
    saved = run / "config.yaml"
    if not saved.is_file():
        return None
    try:
        data = yaml.safe_load(saved.read_text())
    except yaml.YAMLError:
        return None  # not this check's to report: loading says what is wrong
    return data if isinstance(data, dict) else None


def saved_run_kind(path: str | os.PathLike[str]) -> Literal["encoder", "mm1"] | None:
    """Which trainer wrote the run `path` is (or whose checkpoint it is): "encoder" (`mm1
    train-encoder`: its saved config.yaml has an `encoder` section), "mm1" (`mm1 train`), or
    None where no readable config.yaml says."""
    data = _saved_run_config(path)
    if data is None:
        return None
    return "encoder" if "encoder" in data else "mm1"


def encoder_objective(path: str | os.PathLike[str]) -> str | None:
    """The `encoder.objective` of an encoder run (clip, aim, vq, seed; clip when the run left it
    at its default), None for any other directory."""
    data = _saved_run_config(path)
    if data is None or not isinstance(data.get("encoder"), dict):
        return None
    return str(data["encoder"].get("objective", "clip"))


def refuse_encoder_run(path: str | Path) -> None:
    """Refuse an image-encoder run (`mm1 train-encoder`; or one of its checkpoints) where an
    MM1 model is expected: its weights are no MLLM, and loading them would fail listing
    hundreds of state_dict keys. Such a run's saved config.yaml has an `encoder` section."""
    if saved_run_kind(path) == "encoder":
        raise ConfigError(
            f"{path} is an image-encoder run (mm1 train-encoder), not an MM1 model; use it as "
            "train.init.vision or evaluate it with mm1 eval-encoder"
        )


def refuse_mm1_run(path: str | Path) -> None:
    """The reverse of `refuse_encoder_run`: an MM1 run (`mm1 train`) or export where an
    image-encoder run is expected (eval-encoder, export-encoder), whose loading would fail as
    "not a clip encoder run" with a state_dict error."""
    kind = saved_run_kind(path)
    if kind == "mm1":
        raise ConfigError(
            f"{path} is an MM1 model run (mm1 train), not an image-encoder run (mm1 train-encoder)"
        )
    if kind is None and is_export(path):
        raise ConfigError(
            f"{path} is an exported MM1 model, not an image-encoder run (mm1 train-encoder)"
        )


def read_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig (``model.json``) of an exported directory or a run directory."""
    path = Path(path) / MODEL_CONFIG
    data = read_json(path)
    if not isinstance(data, dict):
        raise DamagedFile(f"{path} is not a model config (a JSON object)")
    return model_config_from_dict(data)


def read_model_weights(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> SavedModel:
    """The model of an exported directory, a run directory (its newest complete checkpoint) or
    one checkpoint ``RUN/checkpoints/step_N``, read on this process alone (no collectives; any
    saving world size). `dtype` (None: as saved) is the dtype the model will run in: floating
    weights are read into it one at a time (`mm1.models.family.weight_dtype`), so an export
    never exists in memory as a whole fp32 copy beside the one wanted."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if is_export(p):
        cfg = read_model_config(p)
        # Always a copy: load_file maps the file, which may be rewritten while the model lives.
        try:
            mapped = load_file(str(p / EXPORT_WEIGHTS))
        except SafetensorError as err:  # e.g. a download cut short: "incomplete metadata, ..."
            why = str(err).removeprefix("Error while deserializing header: ")
            raise DamagedFile(
                f"{p / EXPORT_WEIGHTS} is not a readable safetensors file ({why})"
            ) from None
        state = {k: v.to(_read_dtype(cfg, k, v.dtype, dtype), copy=True) for k, v in mapped.items()}
        return SavedModel(cfg, state, p, None)
    if is_run(p):
        saved = _read_newest(p, dtype)
    elif is_checkpoint(p):
        saved = _read_checkpoint(p, p.parent.parent, dtype)
    else:
        raise FileNotFoundError(
            f"{p} is neither an exported model ({EXPORT_WEIGHTS} + {MODEL_CONFIG}), a run "
            f"directory with {CHECKPOINTS_DIR}/, nor one of its {CHECKPOINTS_DIR}/step_N"
        )
    for k, v in saved.state.items():  # the merged LoRA layers: one fp32 tensor freed per cast
        saved.state[k] = v.to(_read_dtype(saved.config, k, v.dtype, dtype))
    return saved


def _read_dtype(
    cfg: ModelConfig, key: str, saved: torch.dtype, dtype: torch.dtype | None
) -> torch.dtype:
    """The dtype weight `key`, saved in `saved`, is read into for a model running in `dtype`."""
    if dtype is None or not saved.is_floating_point:
        return saved
    from mm1.models.family import weight_dtype  # deferred: the models import this module

    return weight_dtype(cfg, key, dtype)


def _read_newest(run: Path, dtype: torch.dtype | None, tries: int = 5) -> SavedModel:
    """The run's newest checkpoint, which may be training on: a save deletes the checkpoints
    beyond `keep` once its own is complete, perhaps the one being read. A read that fails while
    a newer checkpoint has appeared reads that one instead."""
    for _ in range(tries - 1):
        ckpt = _newest_checkpoint(run)
        try:
            return _read_checkpoint(ckpt, run, dtype)
        except (OSError, CheckpointError):
            if latest_checkpoint(run) in (None, ckpt):
                raise  # not overtaken by a save: a real failure
    return _read_checkpoint(_newest_checkpoint(run), run, dtype)


def _newest_checkpoint(run: Path) -> Path:
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no complete checkpoint under {CHECKPOINTS_DIR}/")
    return ckpt


def _read_checkpoint(ckpt: Path, run: Path, dtype: torch.dtype | None) -> SavedModel:
    from mm1.models.lora import merge_lora  # deferred: the models import this module

    cfg = read_model_config(run)
    step = int(read_meta(ckpt)["step"])

    def read_as(key: str, saved: torch.dtype) -> torch.dtype:
        return _read_dtype(cfg, key, saved, dtype)

    state = merge_lora(_read_dcp_model(ckpt, read_as))  # a LoRA run's adapters, in its weights
    if cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight", None)  # the embedding, as in exports
    return SavedModel(cfg, state, ckpt, step)


def _read_dcp_model(
    path: Path, read_as: Callable[[str, torch.dtype], torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """The ``model.*`` tensors of a DCP checkpoint, whole, into CPU tensors shaped by its index,
    after its files were checked against their checksums (a damaged checkpoint is never
    evaluated, served or exported). `read_as(key, saved dtype)` gives the dtype each is read
    into (cast piece by piece as DCP copies it in: a bf16 reader never holds the fp32 model);
    the layers a LoRA run adapted keep theirs, for the merge to add the adapters in fp32."""
    verify_checksums(path, distributed=False)
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    saved = {
        key.removeprefix("model."): info
        for key, info in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(info, _md.TensorStorageMetadata)
    }
    adapted = tuple(k.removesuffix("lora.a") for k in saved if k.endswith(".lora.a"))
    template: dict[str, torch.Tensor] = {}
    for key, info in saved.items():
        dtype = info.properties.dtype
        if read_as is not None and not key.startswith(adapted):
            dtype = read_as(key, dtype)
        template[key] = torch.empty(info.size, dtype=dtype)
    if not template:
        raise CheckpointError(f"{path}: holds no model weights")
    state: dict[str, Any] = {"model": template}
    safe_dcp_load(state, path, distributed=False)
    return state["model"]
