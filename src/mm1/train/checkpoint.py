"""Training checkpoints: DCP-sharded, complete atomically, resumable exactly.

Layout under a run directory::

    RUN_DIR/checkpoints/
        step_1000/          complete: has meta.json
            .metadata       DCP index (written by rank 0)
            __0_0.distcp    rank 0's shards ...
            meta.json       written last, by rank 0
        .tmp_step_2000/     a save in progress (or a crashed one): never counted

A save writes everything into ``.tmp_step_N/`` with ``torch.distributed.checkpoint`` (each rank
writes its own shards), waits for every rank, then rank 0 writes ``meta.json`` and renames the
directory to ``step_N/``; a rename within one file system is atomic, so a crash at any point
leaves either no ``step_N/`` or a complete one, and the previous checkpoints are untouched. Only
after that are the older checkpoints beyond ``keep`` deleted, and ``.tmp_*`` leftovers of a
crashed save are removed at the start of the next save. Saving a step that already exists sets
the old ``step_N/`` aside as ``.tmp_replaced_step_N/`` for the rename; if a crash leaves it
without a ``step_N/``, it still counts as step N and the next save renames it back.

What a checkpoint holds (DCP keys):

- ``model.*`` and ``optim.*``: from ``get_state_dict`` (canonical parameter names, so the same
  code serves an FSDP2 ``fully_shard`` model (DTensor shards), a DDP model or a plain one);
- ``global``: ``step`` and the caller's ``extra`` (scheduler state, counters), written by rank 0;
- ``rank_state.{rank}``: one entry per rank with that rank's ``rank_state`` (its data-loader
  position ...) and RNG states. DCP keeps one copy of a non-tensor value per key, so per-rank
  values need per-rank keys; each rank reads back only its own.

``global`` and ``rank_state.{rank}`` are stored as opaque pickled blobs (``torch.save``): DCP
would otherwise flatten nested dicts (turning int keys into strings, dropping empty containers)
and need a template of the same structure at load time.

Loading never runs code a checkpoint carries: every pickle in it is read with an allow-list, and
anything outside it is refused with a `CheckpointError` naming the file. The reading side (finding
checkpoints, the safe DCP reader and planner, model weights alone) is `mm1.checkpoint`, below
training and inference; its names are re-exported here.

The per-rank entries are why a checkpoint must be loaded by the world size that wrote it
(``load_checkpoint`` raises otherwise). All ranks must see the same file system.

Use from a trainer (every rank; after wrapping the model with ``fully_shard``/DDP and building
the optimizer; under NCCL after ``torch.cuda.set_device``)::

    path = latest_checkpoint(run_dir)
    if path is not None:
        loaded = load_checkpoint(path, model, optimizer)  # also restores the RNG states
        scheduler.load_state_dict(loaded.extra["scheduler"])
        loader.load_state_dict(loaded.rank_state["loader"])
        start_step = loaded.step
    ...
    save_checkpoint(
        run_dir, step, model, optimizer,
        extra={"scheduler": scheduler.state_dict()},
        rank_state={"loader": loader.state_dict()},
        meta={"config_fingerprint": fingerprint},
    )
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import mm1

# Reading lives below training and inference (`mm1.checkpoint`); re-exported for callers here.
from mm1.checkpoint import (
    CHECKPOINTS_DIR,
    CHECKSUMS,
    FORMAT_VERSION,
    META_FILE,
    REPLACED,
    SD_OPTIONS,
    TMP_PREFIX,
    checkpoints_root,
    dist_info,
    foreign_entries,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    orphaned_replacements,
    read_meta,
    step_of,
    verify_checksums,
)
from mm1.checksums import checksum_share
from mm1.config import ConfigError
from mm1.fs import fsync_dir
from mm1.safe_dcp import (
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    dcp_quietly,
    load_plain,
    safe_dcp_load,
)
from mm1.train.disk_space import DiskFullError, is_disk_full, size_estimate

__all__ = [
    "CHECKPOINTS_DIR",
    "META_FILE",
    "CheckpointError",
    "DiskFullError",
    "LoadedCheckpoint",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "capture_rng_state",
    "foreign_entries",
    "foreign_entry_message",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "read_meta",
    "restore_rng_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

_RESERVED_META = frozenset(
    {
        "format_version",
        "step",
        "world_size",
        "time",
        "unix_time",
        "mm1_version",
        "torch_version",
        CHECKSUMS,
    }
)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` restored besides the model, optimizer and RNG states."""

    path: Path
    step: int
    extra: dict[str, Any] = field(default_factory=dict)  # global state, as passed to save
    rank_state: dict[str, Any] = field(default_factory=dict)  # this rank's own state
    meta: dict[str, Any] = field(default_factory=dict)  # the whole meta.json
    # Saved by another number of processes and loaded with `reshard=True`: the model and the
    # optimizer were resharded; no rank state (empty) and no RNG state was restored.
    resharded: bool = False


# ---------------------------------------------------------------------------------------------
# RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python `random`, numpy's global RNG, torch CPU and (when CUDA is
    available) the current CUDA device's generator."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `capture_rng_state` returned (a CUDA state is skipped, with a warning, where
    CUDA is unavailable)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            warnings.warn(
                "the checkpoint holds a CUDA RNG state but CUDA is unavailable; not restored",
                stacklevel=2,
            )


# ---------------------------------------------------------------------------------------------
# Helpers


def _all_ok(exc: BaseException | None, what: str) -> None:
    """Collective (also a barrier): raise on every rank if any rank reports an exception."""
    _, world, distributed = dist_info()
    if not distributed:
        if exc is not None:
            raise exc
        return
    errors: list[str | None] = [None] * world
    dist.all_gather_object(errors, None if exc is None else f"{type(exc).__name__}: {exc}")
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        raise RuntimeError(f"checkpoint {what} failed on " + "; ".join(failed)) from exc


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(blob: Any, what: str, path: Path) -> Any:
    if not isinstance(blob, bytes):
        raise CheckpointError(
            f"{path}: checkpoint entry {what!r} is malformed ({type(blob).__name__})"
        )
    return load_plain(io.BytesIO(blob), path, what, _rank_state_globals())


def _optimizers(optimizer: torch.optim.Optimizer | None) -> tuple[torch.optim.Optimizer, ...]:
    return () if optimizer is None else (optimizer,)


def _optimizer_has_state(optimizer: torch.optim.Optimizer | None) -> bool:
    return optimizer is not None and len(optimizer.state) > 0


def _atomic_rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def foreign_entry_message(path: Path) -> str:
    what = "a directory without " + META_FILE if path.is_dir() else "not a directory"
    return (
        f"{path} is named like a checkpoint but is not one ({what}): saving step "
        f"{step_of(path)} would replace it; move it out of {path.parent}"
    )


def _remove_leftovers(root: Path) -> None:
    for step, p in orphaned_replacements(root):  # the only complete copy of its step: keep it
        log.info("restoring %s, set aside by an interrupted save", p)
        _atomic_rename(p, root / f"step_{step}")
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            log.info("removing leftover %s of an interrupted checkpoint save", p)
            _remove(p)


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    path = directory / META_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _prune(root: Path, run_dir: Path, keep: int, newest: Path) -> None:
    """Delete complete checkpoints beyond the `keep` newest steps; never `newest`."""
    others = [p for p in list_checkpoints(run_dir) if p != newest]
    doomed = others[: max(len(others) - (keep - 1), 0)]
    for p in doomed:
        # Rename first so a crash mid-delete never leaves a partial step_N with its meta.json.
        trash = root / f"{TMP_PREFIX}delete_{p.name}"
        _remove(trash)
        _atomic_rename(p, trash)
        _remove(trash)
        log.info("deleted old checkpoint %s (keep=%d)", p, keep)


def _rank_state_globals() -> list[Any]:
    """What our rank-state blob holds besides plain data: numpy's RNG state (an ndarray)."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else None
    if reconstruct is None:  # numpy 1.x
        reconstruct = np.core.multiarray._reconstruct
    return [
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
        reconstruct,
        # numpy 1.x writes the function under its old module name; numpy 2.x under _core
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
    ]


def _failed_save(
    exc: BaseException, step: int, final: Path, tmp: Path, needed: int, rank: int
) -> BaseException:
    """Clean up after a failed save and return the error to raise: rank 0 removes the partial
    directory (so it does not hold on to the space); the complete checkpoints stay."""
    full = is_disk_full(exc, tmp.parent if tmp.parent.exists() else final.parent, needed)
    if rank == 0:
        _remove(tmp)
    if not full:
        return exc
    kept = [p.name for p in list_checkpoints(final.parent.parent)]
    after = (
        f"kept {', '.join(kept)}; free space and rerun to resume" if kept else "no checkpoint yet"
    )
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device while saving step {step} to {final} (needs about "
        f"{max(needed / 2**20, 0.1):.1f} MiB); removed the partial {tmp.name}, {after}",
    )


# ---------------------------------------------------------------------------------------------
# Save / load


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    extra: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Save a complete checkpoint to ``RUN_DIR/checkpoints/step_{step}/`` and return its path.

    Call it on every rank (it is collective). ``extra`` is global state (rank 0's copy is
    saved), ``rank_state`` this rank's own state; both hold plain data (containers, numbers,
    strings, tensors, numpy arrays): loading refuses anything else, since code can hide in a
    pickle. The RNG states of every rank are saved too, and left as they were. ``meta`` (JSON-serialisable, e.g.
    a config fingerprint) is merged into ``meta.json``. Then only the ``keep`` newest complete
    checkpoints are kept (the new one always is). An existing ``step_{step}`` is replaced.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    user_meta = dict(meta or {})
    clash = sorted(_RESERVED_META & set(user_meta))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved for the checkpoint's own fields")
    json.dumps(user_meta)  # fail early (on every rank) if it is not JSON-serialisable

    run_dir = Path(run_dir)
    root = checkpoints_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f"{TMP_PREFIX}step_{step}"
    rank, world, distributed = dist_info()
    rng = capture_rng_state()

    # 1. Rank 0 clears leftovers of crashed saves; every rank builds its state dict.
    error: Exception | None = None
    state: dict[str, Any] = {}
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            if final.exists() and not (final / META_FILE).is_file():  # not one mm1 wrote
                raise CheckpointError(foreign_entry_message(final))
            tmp.mkdir()
        had_state = _optimizer_has_state(optimizer)
        model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer), options=SD_OPTIONS)
        if optimizer is not None and not had_state:
            # get_state_dict initialises an untouched optimizer with a zero-lr step (AdamW's
            # step count becomes 1), which would change how the run continues: undo it, and
            # have load_checkpoint do the same.
            optimizer.state.clear()
        state["model"] = model_sd
        if optimizer is not None:
            state["optim"] = optim_sd
        state["rank_state"] = {
            str(rank): _pack(
                {
                    "rank": rank,
                    "user": rank_state,
                    "rng": rng,
                    "optimizer_has_state": had_state,
                }
            )
        }
        if rank == 0:
            state["global"] = _pack({"step": step, "extra": extra})
    except Exception as e:
        error = e
    _all_ok(error, f"save to {tmp} (preparing)")

    # 2. Every rank writes its shards (DCP propagates a failure on one rank to all).
    needed = size_estimate(state, world)
    try:
        dcp_quietly(dcp.save, state, checkpoint_id=tmp, no_dist=not distributed)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise _failed_save(e, step, final, tmp, needed, rank) from None
    del state
    _barrier()
    sums = _checksums(tmp, rank, world, distributed)

    # 3. Rank 0 completes it: meta.json, then the atomic rename; then prunes old ones.
    error = None
    if rank == 0:
        try:
            now = time.time()
            doc = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": world,
                "time": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(),
                "unix_time": now,
                "mm1_version": mm1.__version__,
                "torch_version": torch.__version__,
                CHECKSUMS: sums,
                **user_meta,
            }
            _write_meta(tmp, doc)
            fsync_dir(tmp)
            replaced = None
            if final.exists():
                replaced = root / f"{TMP_PREFIX}{REPLACED}{final.name}"
                _remove(replaced)
                _atomic_rename(final, replaced)
            _atomic_rename(tmp, final)
            fsync_dir(root)
            if replaced is not None:
                _remove(replaced)
        except Exception as e:
            error = _failed_save(e, step, final, tmp, needed, rank)
        else:
            try:
                _prune(root, run_dir, keep, final)
            except OSError as e:  # the new checkpoint is complete; a failed cleanup is not fatal
                log.warning("could not delete old checkpoints in %s: %s", root, e)
    _all_ok(error, f"save to {final} (completing)")

    restore_rng_state(rng)  # saving must not change what the run draws next
    log.info("saved checkpoint %s", final)
    return final


def _checksums(tmp: Path, rank: int, world: int, distributed: bool) -> dict[str, Any]:
    """Every written file's checksum for meta.json (collective: each rank reads a share back,
    mostly from the page cache), over rank 0's list of the files. A failure on any rank fails
    the save on all, the partial directory removed."""
    error: Exception | None = None
    names: list[Any] = [None]
    try:
        if rank == 0:
            names = [sorted(p.name for p in tmp.iterdir() if p.is_file())]
    except OSError as e:
        error = e
    _checksum_step_ok(error, tmp, rank)
    if distributed:
        dist.broadcast_object_list(names, src=0)
    share: dict[str, Any] = {}
    try:
        share = checksum_share(tmp, names[0], rank, world)
    except OSError as e:
        error = e
    _checksum_step_ok(error, tmp, rank)
    shares = [share]
    if distributed:
        shares = [{}] * world
        dist.all_gather_object(shares, share)
    return dict(sorted((name, s) for part in shares for name, s in part.items()))


def _checksum_step_ok(error: Exception | None, tmp: Path, rank: int) -> None:
    try:
        _all_ok(error, f"save to {tmp} (checksums)")
    except BaseException:
        if rank == 0:
            _remove(tmp)
        raise


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    reshard: bool = False,
) -> LoadedCheckpoint:
    """Load a complete checkpoint into `model` and `optimizer` (already wrapped/sharded as when
    saved, any FSDP2 mesh) and restore this rank's RNG states. Collective: call it on every rank
    with the same `path`. The world size must equal the one that saved it, unless `reshard`:
    then the model and optimizer are resharded onto this world (DCP reads any layout) and the
    per-rank states, which belong to ranks that no longer exist, are left out (`resharded`)."""
    path = Path(path)
    meta = read_meta(path)
    rank, world, distributed = dist_info()
    saved_world = meta.get("world_size")
    resharded = saved_world != world
    if resharded and not (reshard and isinstance(saved_world, int) and saved_world > 0):
        raise ConfigError(  # how the run was started: exit 2, as the CLI's other refusals
            f"checkpoint {path} was saved by {saved_world} process(es) but this run has world "
            f"size {world}: the per-rank states (data-loader positions, RNG states) cannot be "
            f"remapped; resume with {saved_world} process(es), or with --reshard to continue on "
            f"{world}: the model, optimizer and schedule resume, the data restarts in a new "
            "shuffle (records may repeat)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version={meta.get('format_version')}, "
            f"this code reads {FORMAT_VERSION}"
        )

    # Before anything of it is read (its index included): every file as its save recorded it.
    verify_checksums(path, distributed)

    # Templates: DCP loads tensors in place into these (this rank's shards of them).
    model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer), options=SD_OPTIONS)
    # Resharded, every rank reads rank 0's state for what all ranks share (whether the
    # optimizer had stepped), and uses none of its own (loader positions, RNG).
    key = "0" if resharded else str(rank)
    state: dict[str, Any] = {"model": model_sd, "global": None, "rank_state": {key: None}}
    if optimizer is not None:
        state["optim"] = optim_sd
    swapped = _saved_scalars_into_views(state, path)
    safe_dcp_load(state, path, distributed)
    for container, k, template in swapped:
        container[k] = template
    set_state_dict(
        model,
        _optimizers(optimizer),
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
        options=SD_OPTIONS,
    )

    glob = _unpack(state["global"], "global", path)
    mine = _unpack(state["rank_state"][key], f"rank_state.{key}", path)
    if mine["rank"] != int(key):
        raise ValueError(f"rank {key} got the state of rank {mine['rank']} from {path}")
    if optimizer is not None and not mine["optimizer_has_state"]:
        optimizer.state.clear()  # it had not stepped yet when saved (see save_checkpoint)
    if not resharded:
        restore_rng_state(mine["rng"])
    log.info("loaded checkpoint %s (step %d)", path, glob["step"])
    return LoadedCheckpoint(
        path=path,
        step=int(glob["step"]),
        extra=glob["extra"] if glob["extra"] is not None else {},
        rank_state=mine["user"] if mine["user"] is not None and not resharded else {},
        meta=meta,
        resharded=resharded,
    )


def _saved_scalars_into_views(state: dict[str, Any], path: Path) -> list[tuple[dict, str, Any]]:
    """Where the checkpoint holds a scalar and the template one element (CLIP's logit scale and
    its optimizer state, saved before the scale had a dimension), DCP loads into a 0-d view of
    the template instead; the (container, key, template) entries put the templates back."""
    saved = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    scalars = {k for k, info in saved.items() if getattr(info, "size", None) == torch.Size([])}
    swapped: list[tuple[dict, str, Any]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif key in scalars and type(v) in (torch.Tensor, nn.Parameter) and v.shape == (1,):
                swapped.append((node, k, v))  # not a DTensor: no sharded run saved a scalar

    walk(state, "")
    for container, k, template in swapped:
        container[k] = template.view(())
    return swapped
