"""Tests on 2 gloo ranks: each rank a spawned process, joined through a file store (no free port
to find, and lose to another process, on a shared machine).

On the 2-core machine, 4 of about 430 runs of a 2-process test hung until killed beside a
loaded suite (none of 120 alone); CI failed on one. In the two watched, the ranks' work had
ended: the stack watchdog armed for it had been cancelled. So, as the CLI's ranks do, a rank
ends its process with `os._exit` once its work is done and its group destroyed. Should a run
still hang, ranks that all finished are ended (with a warning); a hang in the work is retried
once, with each rank's stack in the warning; a second fails the test. A rank's error or a
wrong result fails the test at once."""

from __future__ import annotations

import faulthandler
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm1.train.parallel import exit_now

WORLD = 2
STACK_AFTER_S = 90.0  # a rank still working then writes its stack (the spawner waits longer)
EXIT_S = 15.0  # how long ranks that finished their work may take to end


def _file(root: Path, store: str, what: str, rank: int) -> Path:
    return root / f"{store}.{what}{rank}"


def _stack(root: Path, store: str, rank: int) -> str:
    path = _file(root, store, "stack", rank)
    return path.read_text() if path.exists() else "(not written: the rank had not joined)"


@contextmanager
def gloo_rank(rank: int, root: str, store: str = "store", world: int = WORLD) -> Iterator[None]:
    """This process as `rank` of the group whose file store is `root/store`, one thread, for
    the block; the process ends with it. Its stack is written if the work takes
    `STACK_AFTER_S`; a marker says that the work is done."""
    faulthandler.enable()  # a stack trace if the rank dies
    stack = _file(Path(root), store, "stack", rank).open("w")  # open until the process ends
    faulthandler.dump_traceback_later(STACK_AFTER_S, file=stack)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(root) / store}", rank=rank, world_size=world
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
    _file(Path(root), store, "done", rank).touch()
    exit_now(0)  # as the CLI's ranks end: the interpreter's finalisation can hang or abort


def spawn_ranks(
    worker: Callable[..., None],
    root: Path,
    *args: object,
    what: str,
    store: str = "store",
    timeout: float = 120.0,
    world: int = WORLD,
) -> None:
    """Run `worker(rank, str(root), *args)` on `world` processes; its ranks join with
    `gloo_rank(rank, root, store, world)`. A rank's error fails the test. A hang in the work is
    retried once; ranks that finished the work but hang on the way out are ended."""
    assert timeout > STACK_AFTER_S + 10, "the ranks' stacks must be written before the kill"
    for attempt in (1, 2):
        for kind in ("stack", "done"):
            for r in range(world):
                _file(root, store, kind, r).unlink(missing_ok=True)
        (root / store).unlink(missing_ok=True)
        ctx = mp.spawn(worker, args=(str(root), *args), nprocs=world, join=False)
        deadline, done_at = time.monotonic() + timeout, None
        while not ctx.join(timeout=1):
            if done_at is None and all(
                _file(root, store, "done", r).exists() for r in range(world)
            ):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() > done_at + EXIT_S:
                break
            if time.monotonic() > deadline:
                break
        else:
            return
        for p in ctx.processes:
            p.kill()
        stacks = "\n".join(f"rank {r}:\n{_stack(root, store, r)}" for r in range(world))
        if done_at is not None:
            warnings.warn(
                f"{world}-process {what}: the ranks' work ended, not their processes.\n{stacks}",
                stacklevel=2,
            )
            return
        warnings.warn(
            f"{world}-process {what} did not finish in {timeout:.0f} s (attempt {attempt}).\n{stacks}",
            stacklevel=2,
        )
    pytest.fail(f"{world}-process {what} did not finish in {timeout:.0f} s, twice")
