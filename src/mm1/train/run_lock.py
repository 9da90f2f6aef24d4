"""One training process per run directory: a lock held by rank 0 while a trainer runs.

Two trainers on one `train.run_dir` would each remove the other's unfinished saves (`.tmp_*`)
and interleave their metrics. Rank 0 holds a POSIX record lock (`fcntl.lockf`) on
`RUN_DIR/.lock` for the whole of `fit`. The kernel drops it when the process ends, however it
ends, so a crashed or killed run leaves no stale lock. POSIX locks belong to a process, so
trainers built one after another in one process (a notebook, the tests) never refuse each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from mm1.config import ConfigError
from mm1.fs import LOCKS_UNSUPPORTED
from mm1.train.parallel import Dist

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


# the trainer's message when another process holds the run dir (`{holder}`: " (pid N)")
TRAINING = (
    "another process{holder} is training in it; wait for it to finish or stop it, or choose "
    "another train.run_dir"
)


def claim(
    run_dir: Path, *, name: str | None = None, lock_file: str = LOCK_FILE, busy: str = TRAINING
) -> int:
    """Create `run_dir` if needed and lock it; the open lock file's descriptor. Raises a
    `ConfigError` naming `train.run_dir` when it cannot be written or another process holds it.
    Other users (`mm1 ablate`'s study lock) name their own setting (`name`, e.g. "--out DIR"),
    lock file and `busy` message (`{holder}`: " (pid N)" of the process holding it)."""
    where = name if name is not None else f"train.run_dir={run_dir}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a file, under a file, read-only, a name too long ...
        why = err.strerror or str(err)
        if err.errno == errno.EEXIST:  # mkdir of a path that is a file
            why = "a file, not a directory"
        raise ConfigError(
            f"{where}: cannot write there ({why}); choose a writable directory"
        ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in LOCKS_UNSUPPORTED:
            log.warning(
                "%s: this file system has no file locks (%s): a second process on it "
                "would not be refused",
                where,
                err.strerror or err,
            )
            return fd
        holder = _read_holder(fd)
        os.close(fd)
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise ConfigError(f"{where}: {busy.format(holder=holder)}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    """ " (pid N)" from the lock file, written by the process that holds it; "" if unreadable."""
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
    return ""


@contextlib.contextmanager
def held(run_dir: Path, d: Dist) -> Iterator[None]:
    """`claim` on the main rank for the duration of the block; every rank raises if it failed
    (rather than waiting at the next collective for a rank that has gone). A run directory the
    claim created is removed again when the block fails before writing anything in it (a
    config error found in the set-up leaves no empty run behind)."""
    fd, error = None, None
    try:
        created = not run_dir.exists()
    except OSError:  # a name the file system refuses: the claim says so
        created = False
    if d.is_main:
        try:
            fd = claim(run_dir)
        except ConfigError as err:
            error = err
    failed = d.all_reduce_sum(torch.tensor([float(error is not None)], device=d.device))
    if error is not None:
        raise error
    if failed.item():
        raise ConfigError(f"train.run_dir={run_dir}: rank 0 could not claim it (see its error)")
    failed = True
    try:
        yield
        failed = False
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock
            if failed and created:
                _remove_if_untouched(run_dir)


def _remove_if_untouched(run_dir: Path) -> None:
    """Remove `run_dir` if it holds only the lock file."""
    with contextlib.suppress(OSError):
        if [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()
