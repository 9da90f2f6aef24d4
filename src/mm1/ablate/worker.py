"""`python -m mm1.ablate.worker SPEC STUDY CELL_ID`: one cell of a study in its own process
(`mm1 ablate --jobs N`), pinned to the CPUs in MM1_CELL_CPUS with one torch thread each. SPEC
is the cell as the runner planned it when the run started (`runner.write_spec`): its config
file, its record and the evaluation suites; the grid file itself is never read again.

The worker asks the kernel for SIGTERM when the runner dies (Linux), so a runner killed with
SIGKILL leaves no cell training on: the trainer saves its checkpoint and stops on SIGTERM."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# the runner's pid, for the worker to notice that it died before the worker asked to be told
PARENT_ENV = "MM1_ABLATE_PARENT"


def die_with_parent(parent: int | None) -> None:
    """Have the kernel tell this process when its parent dies (Linux's prctl), which becomes
    one SIGTERM (the trainer saves and stops); then, if the parent (`parent`, its pid as the
    runner passed it) is already gone, stop now. Where prctl is missing (not Linux) nothing
    is done."""
    if not sys.platform.startswith("linux"):
        return
    # Not SIGTERM itself: the kernel signals a child each time the thread it belongs to exits
    # and it passes to another of the runner's threads, so a killed runner sent it twice or
    # more, and the trainer took the second for "stop again" and stopped mid-save.
    signal.signal(PARENT_DIED, _parent_died)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, PARENT_DIED, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    # the parent died before the request: the kernel will not tell us, so act as it would
    if parent is not None and os.getppid() != parent:
        signal.raise_signal(PARENT_DIED)


PARENT_DIED = signal.SIGUSR2
_told = False


def _parent_died(signum: int, frame: object) -> None:
    """The first parent-death signal is a SIGTERM to this process; the repeats are not."""
    global _told
    if not _told:
        _told = True
        signal.raise_signal(signal.SIGTERM)


def main(argv: list[str]) -> int:
    spec_path, _study_dir, _cell_id = argv
    parent = os.environ.get(PARENT_ENV)
    die_with_parent(int(parent) if parent else None)
    cpus = [int(c) for c in os.environ.get("MM1_CELL_CPUS", "").split(",") if c]
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    from mm1.ablate.cell import run_cell
    from mm1.config import load_config

    if cpus:
        torch.set_num_threads(len(cpus))
    cfg = load_config(spec["config"])
    try:
        record = run_cell(cfg, spec["record"], spec["suites"])
    except KeyboardInterrupt:
        # Ctrl-C outside training (e.g. evaluating): the cell stays running and resumes on the
        # next sitting; 130 tells the runner a signal stopped it, not a failure
        return 130
    return 0 if record["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
