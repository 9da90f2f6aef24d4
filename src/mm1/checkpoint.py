"""Reading saved mm1 models, below both training and inference: run checkpoints (DCP, read
safely) and exported directories.

A run directory keeps its checkpoints under ``RUN_DIR/checkpoints/step_N/`` (complete when it
has ``meta.json``; see `mm1.train.checkpoint` for how they are written). Reading never runs code
a checkpoint carries: every pickle in it is read with an allow-list (see "Safe loading"), and
anything outside it is refused with a `CheckpointError` naming the file.

An exported directory holds ``model.safetensors`` (a tied head stored once) and ``model.json``
(the ModelConfig the weights belong to); `mm1.pretrained` adds the tokenizer and processor.

`read_model_weights` gives the full state dict of any of them (run, checkpoint step, export)
without building a model: training starts from it (`train.init`), inference loads it.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mm1.checksums import find_damage, plain_name
from mm1.config import ConfigError, ModelConfig, model_config_from_dict
from mm1.fs import DamagedFile, read_json

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


class CheckpointError(ValueError):
    """A checkpoint that is refused: tampered with, truncated, or not written by this code."""


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


def dcp_quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    # DCP warns on every call without a process group; that is the intended single-process use.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Safe loading
#
# A checkpoint holds three kinds of pickle: DCP's ``.metadata`` index, the byte items DCP writes
# for non-tensor values (optimizer hyper-parameters, our two blobs), and our blobs themselves.
# Plain unpickling of any of them runs whatever code a crafted file names, so each is read with
# an allow-list. ``.metadata`` is pickled with protocol 4, which torch's weights-only unpickler
# cannot parse (FRAME, MEMOIZE, STACK_GLOBAL), so it goes through a `pickle.Unpickler` whose
# `find_class` admits only DCP's metadata classes; the other two are torch.save (protocol 2) and
# go through ``torch.load(weights_only=True)``.


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_plain(data: io.BytesIO, where: object, what: str, allowed: list[Any] | None = None) -> Any:
    """`torch.load` of a checkpoint entry, weights-only (plus the `allowed` globals): anything
    else it names is refused with a `CheckpointError` naming `where` and the entry `what`."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{where}: refused the entry {what!r}: it holds more than plain data "
            f"({first_line(err)}); it was tampered with or not written by mm1"
        ) from None
    except Exception as err:  # truncated or corrupt
        raise CheckpointError(
            f"{where}: could not read the entry {what!r} ({first_line(err)})"
        ) from None


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """The classes and functions a DCP ``.metadata`` pickle may name, by (module, name)."""
    allowed: list[Any] = [
        _md.Metadata,
        _md.MetadataIndex,
        _md.TensorStorageMetadata,
        _md.BytesStorageMetadata,
        _md.ChunkStorageMetadata,
        _md.TensorProperties,
        _md.StorageMeta,
        _md._MEM_FORMAT_ENCODING,
        _StorageInfo,
        torch.Size,
        torch.serialization._get_layout,  # how torch.layout values pickle
    ]
    out = {(obj.__module__, obj.__qualname__): obj for obj in allowed}
    # StorageMeta.checkpoint_id is the path the checkpoint was saved to.
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath):
        out[(cls.__module__, cls.__qualname__)] = out[("pathlib", cls.__name__)] = cls
    for name in dir(torch):  # dtypes pickle as the attribute of `torch` they are
        if isinstance(getattr(torch, name, None), torch.dtype):
            out[("torch", name)] = getattr(torch, name)
    return out


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._allowed = _metadata_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, not a DCP class") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent id")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, except that ``.metadata`` is unpickled with an allow-list of
    DCP's own classes and may only point at data files inside the checkpoint directory."""

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._metadata: dict[Any, _md.Metadata] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> _md.Metadata:
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = self._read_safely(Path(self._get_metadata_path(rank)))
        metadata = self._metadata[rank]
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = _md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    @staticmethod
    def _read_safely(path: Path) -> _md.Metadata:
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as err:
                raise CheckpointError(
                    f"{path}: refused to load checkpoint metadata ({first_line(err)}); "
                    "it was not written by DCP or was tampered with"
                ) from None
        if not isinstance(metadata, _md.Metadata) or not isinstance(metadata.storage_data, dict):
            raise CheckpointError(f"{path}: not a DCP checkpoint index ({type(metadata).__name__})")
        for info in metadata.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not plain_name(name):
                raise CheckpointError(f"{path}: refers to data outside the checkpoint ({name!r})")
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that byte items (non-tensor values) are unpickled
    weights-only, and refused for keys the state being loaded holds as tensors: the metadata
    decides which keys are read as bytes, so a tampered index could otherwise swap a tensor.
    `root` (the checkpoint directory) names the data file in errors."""

    def __init__(self, root: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._root = Path(root)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        where = self._where(read_item)
        if isinstance(self.state_dict.get(fqn), torch.Tensor):
            raise CheckpointError(
                f"{where}: {fqn!r} is stored as pickled bytes where a tensor belongs; refused"
            )
        obj = load_plain(value, where, fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    def _where(self, read_item: ReadItem) -> str:
        """The data file an item comes from (the checkpoint directory when unknown)."""
        storage = getattr(self.metadata, "storage_data", None) or {}
        name = getattr(storage.get(read_item.storage_index), "relative_path", None)
        return str(self._root / name) if name else str(self._root)


def safe_dcp_load(state: dict[str, Any], path: Path, distributed: bool) -> None:
    """`dcp.load` through the safe reader and planner; a refusal surfaces as its own one-line
    `CheckpointError` rather than inside DCP's multi-rank traceback dump."""
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # refused here, before DCP (which logs and retries a failed read)
    try:
        dcp_quietly(
            dcp.load,
            state,
            checkpoint_id=path,
            storage_reader=reader,
            planner=SafeLoadPlanner(path),
            no_dist=not distributed,
        )
    except CheckpointException as exc:
        inner = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
        for e in inner:
            if isinstance(e, CheckpointError):
                raise CheckpointError(str(e)) from None
        # A truncated or corrupt data file: one line, not DCP's per-rank traceback dump.
        why = first_line(inner[0]) if inner else "unknown error"
        raise CheckpointError(f"{path}: could not read the checkpoint ({why})") from exc


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
        state = {k: v.to(_read_dtype(cfg, k, v, dtype), copy=True) for k, v in mapped.items()}
        return SavedModel(cfg, state, p, None)
    if is_run(p):
        saved = _read_newest(p)
    elif is_checkpoint(p):
        saved = _read_checkpoint(p, p.parent.parent)
    else:
        raise FileNotFoundError(
            f"{p} is neither an exported model ({EXPORT_WEIGHTS} + {MODEL_CONFIG}), a run "
            f"directory with {CHECKPOINTS_DIR}/, nor one of its {CHECKPOINTS_DIR}/step_N"
        )
    for k, v in saved.state.items():  # replaced one at a time: one fp32 tensor freed per cast
        saved.state[k] = v.to(_read_dtype(saved.config, k, v, dtype))
    return saved


def _read_dtype(
    cfg: ModelConfig, key: str, value: torch.Tensor, dtype: torch.dtype | None
) -> torch.dtype:
    if dtype is None or not value.is_floating_point():
        return value.dtype
    from mm1.models.family import weight_dtype  # deferred: the models import this module

    return weight_dtype(cfg, key, dtype)


def _read_newest(run: Path, tries: int = 5) -> SavedModel:
    """The run's newest checkpoint, which may be training on: a save deletes the checkpoints
    beyond `keep` once its own is complete, perhaps the one being read. A read that fails while
    a newer checkpoint has appeared reads that one instead."""
    for _ in range(tries - 1):
        ckpt = _newest_checkpoint(run)
        try:
            return _read_checkpoint(ckpt, run)
        except (OSError, CheckpointError):
            if latest_checkpoint(run) in (None, ckpt):
                raise  # not overtaken by a save: a real failure
    return _read_checkpoint(_newest_checkpoint(run), run)


def _newest_checkpoint(run: Path) -> Path:
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no complete checkpoint under {CHECKPOINTS_DIR}/")
    return ckpt


def _read_checkpoint(ckpt: Path, run: Path) -> SavedModel:
    from mm1.models.lora import merge_lora  # deferred: the models import this module

    cfg = read_model_config(run)
    step = int(read_meta(ckpt)["step"])
    state = merge_lora(_read_dcp_model(ckpt))  # a LoRA run's adapters, in their weights
    if cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight", None)  # the embedding, as in exports
    return SavedModel(cfg, state, ckpt, step)


def _read_dcp_model(path: Path) -> dict[str, torch.Tensor]:
    """The ``model.*`` tensors of a DCP checkpoint, whole, into CPU tensors shaped by its index,
    after its files were checked against their checksums (a damaged checkpoint is never
    evaluated, served or exported)."""
    verify_checksums(path, distributed=False)
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    template: dict[str, torch.Tensor] = {}
    for key, info in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(info, _md.TensorStorageMetadata):
            template[key.removeprefix("model.")] = torch.empty(
                info.size, dtype=info.properties.dtype
            )
    if not template:
        raise CheckpointError(f"{path}: holds no model weights")
    state: dict[str, Any] = {"model": template}
    safe_dcp_load(state, path, distributed=False)
    return state["model"]
