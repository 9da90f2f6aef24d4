"""Tests on 2 gloo ranks: each rank a spawned process, joined through a file store (no free port
to find, and lose to another process, on a shared machine).

On an oversubscribed 2-core machine, about 1 run in 30 of a 2-process test with a few dozen
collectives hung in gloo (reproduced beside a loaded suite; never alone in 120 runs). So a
run that does not finish in time is retried once, with a warning that carries each rank's
stack at the hang; a second hang fails the test, and a wrong result or a rank's error fails it
at once."""

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

WORLD = 2
STACK_AFTER_S = 90.0  # a rank still working then writes its stack (the spawner waits longer)
EXIT_S = 15.0  # a rank still exiting this long after its work writes its stack


def _file(root: Path, store: str, what: str, rank: int) -> Path:
    return root / f"{store}.{what}{rank}"


def _stack(root: Path, store: str, rank: int) -> str:
    path = _file(root, store, "stack", rank)
    return path.read_text() if path.exists() else "(not written: the rank had not joined)"


@contextmanager
def gloo_rank(rank: int, root: str, store: str = "store") -> Iterator[None]:
    """This process as `rank` of the group whose file store is `root/store`, one thread. Its
    stack is written `STACK_AFTER_S` into the work, or `EXIT_S` after it, if it is still there;
    a marker says that the work is done."""
    faulthandler.enable()  # a stack trace if the rank dies
    stack = _file(Path(root), store, "stack", rank).open("w")  # open until the process ends
    faulthandler.dump_traceback_later(STACK_AFTER_S, file=stack)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(root) / store}", rank=rank, world_size=WORLD
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
    faulthandler.dump_traceback_later(EXIT_S, file=stack)
    _file(Path(root), store, "done", rank).touch()


def spawn_ranks(
    worker: Callable[..., None],
    root: Path,
    *args: object,
    what: str,
    store: str = "store",
    timeout: float = 120.0,
) -> None:
    """Run `worker(rank, str(root), *args)` on `WORLD` processes; its ranks join with
    `gloo_rank(rank, root, store)`. A rank's error fails the test. A hang in the work is
    retried once; ranks that finished the work but hang on the way out are ended."""
    assert timeout > STACK_AFTER_S + 10, "the ranks' stacks must be written before the kill"
    for attempt in (1, 2):
        for kind in ("stack", "done"):
            for r in range(WORLD):
                _file(root, store, kind, r).unlink(missing_ok=True)
        (root / store).unlink(missing_ok=True)
        ctx = mp.spawn(worker, args=(str(root), *args), nprocs=WORLD, join=False)
        deadline, done_at = time.monotonic() + timeout, None
        while not ctx.join(timeout=1):
            if done_at is None and all(
                _file(root, store, "done", r).exists() for r in range(WORLD)
            ):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() > done_at + EXIT_S + 5:
                break
            if time.monotonic() > deadline:
                break
        else:
            return
        for p in ctx.processes:
            p.kill()
        stacks = "\n".join(f"rank {r}:\n{_stack(root, store, r)}" for r in range(WORLD))
        if done_at is not None:
            warnings.warn(
                f"2-process {what}: the ranks' work ended, not their processes.\n{stacks}",
                stacklevel=2,
            )
            return
        warnings.warn(
            f"2-process {what} did not finish in {timeout:.0f} s (attempt {attempt}).\n{stacks}",
            stacklevel=2,
        )
    pytest.fail(f"2-process {what} did not finish in {timeout:.0f} s, twice")
