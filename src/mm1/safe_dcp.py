"""Reading DCP checkpoints without running code they carry.

A checkpoint holds three kinds of pickle: DCP's ``.metadata`` index, the byte items DCP writes
for non-tensor values (optimizer hyper-parameters, our two blobs), and our blobs themselves.
Plain unpickling of any of them runs whatever code a crafted file names, so each is read with
an allow-list. ``.metadata`` is pickled with protocol 4, which torch's weights-only unpickler
cannot parse (FRAME, MEMOIZE, STACK_GLOBAL), so it goes through a `pickle.Unpickler` whose
`find_class` admits only DCP's metadata classes; the other two are torch.save (protocol 2) and
go through ``torch.load(weights_only=True)``. Anything else is refused with a `CheckpointError`
naming the file.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem

from mm1.checksums import plain_name


class CheckpointError(ValueError):
    """A checkpoint that is refused: tampered with, truncated, or not written by this code."""


def dcp_quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    # DCP warns on every call without a process group; that is the intended single-process use.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


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
