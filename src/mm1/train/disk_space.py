"""How much room a checkpoint save needs, and whether a failed one ran out of it."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException


class DiskFullError(OSError):
    """A save that ran out of disk space (its partial directory already removed)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the sentence alone, without "[Errno 28]"


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


_ITEM_OVERHEAD = 1600  # bytes DCP adds per stored value (a zip archive each, and its index entry)


def size_estimate(state: Mapping[str, Any], world: int) -> int:
    """Bytes the whole checkpoint will take, from this rank's state: a sharded tensor (DTensor)
    its whole size once (DCP writes each shard from one rank, HSDP's replicas too), with one
    stored item per rank; everything else once (written from one rank)."""
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        if isinstance(node, Mapping):
            for v in node.values():
                walk(v)
            return
        items = world if hasattr(node, "to_local") else 1
        size = 0
        if isinstance(node, torch.Tensor):
            size = node.numel() * node.element_size()  # a DTensor's numel is the whole tensor's
        elif isinstance(node, bytes):
            size = len(node)
        total += size + items * _ITEM_OVERHEAD

    walk(state)
    return total


def is_disk_full(exc: BaseException, where: Path, needed: int) -> bool:
    """An ENOSPC anywhere in the exception (DCP wraps each rank's), or a disk that cannot hold
    the checkpoint: torch's zip writer turns a failed write into 'unexpected pos', losing the
    errno."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if isinstance(e, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    try:
        return shutil.disk_usage(where).free < needed
    except OSError:
        return False
