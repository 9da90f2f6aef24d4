"""A `torch.profiler` window over a few training steps (`train.profile_at`, `train.profile_steps`).

Each rank writes `RUN/profile/steps_A-B/rank{R}.json`, a Chrome trace (open it in
https://ui.perfetto.dev or chrome://tracing), and `rank{R}.txt`, the operators by self time
(device time on a GPU). The window holds everything the loop does from the start of step A to
the end of step B: data waits, and the logging, validation or save that follow a step are in
it too. The step before the window runs under the profiler too, unrecorded, so that the
window does not hold the profiler's own start-up; the trace numbers its steps from that one
(`ProfilerStep#1` is step A; `#0` when A is the run's first step, which has none before it). What a step computes is unchanged: the profiler only observes,
and a profile that cannot be written (a full disk) is a warning, not the end of the run.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"
TABLE_ROWS = 40


class StepProfiler:
    """Call `begin(step)` before each step (`step`: the one about to run, from 1) and `end()`
    after it; `close()` when the loop ends, however it ends (a window cut short by the end of
    the run or a signal is written as far as it got). Both return the trace once written."""

    def __init__(self, run_dir: Path, at: int, steps: int, rank: int, device: torch.device):
        self.first, self.last = at, at + steps - 1
        self.rank, self.device = rank, device
        self.out = Path(run_dir) / PROFILE_DIR / f"steps_{self.first}-{self.last}"
        self._prof: profile | None = None
        self._done = False  # written, failed, or never to run (a resume past its start)
        self.written: Path | None = None  # the trace, until end() / close() hands it over

    @property
    def steps(self) -> str:
        """The window, as a log line names it."""
        return (
            f"step {self.first}" if self.first == self.last else f"steps {self.first}-{self.last}"
        )

    def begin(self, step: int) -> None:
        if self.first <= 0 or self._prof is not None or self._done:
            return
        warmup = 1 if self.first > 1 else 0
        if step > self.first - warmup:
            self._done = True  # a resume past the window's start: it is not profiled
        if step != self.first - warmup:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        if not warmup:  # the first step: torch warns that it has no warm-up, which we know
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
        self._prof = profile(
            activities=activities,
            # repeat=1: one window (0 would start recording again after it)
            schedule=schedule(wait=0, warmup=warmup, active=self.last - self.first + 1, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=True,
            acc_events=True,
        )
        self._prof.start()

    def end(self) -> Path | None:
        """After a step; the trace's path once, after the window's last step wrote it."""
        if self._prof is None:
            return None
        self._guarded(self._prof.step)
        return self._finish() if self._done else None

    def close(self) -> Path | None:
        """Stop profiling, writing what a window cut short recorded; its path, if not given
        before."""
        return self._finish() if self._prof is not None else None

    def _finish(self) -> Path | None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            self._guarded(prof.stop)  # a window cut short is written here
        self._done = True
        written, self.written = self.written, None
        return written

    def _guarded(self, call: Callable[[], object]) -> None:
        """`call`, with any failure a warning (a profile never stops training)."""
        try:
            call()
        except Exception as err:
            log.warning("profiling %s failed, training goes on: %s", self.steps, err)
            self._done = True
            prof, self._prof = self._prof, None
            if prof is not None:
                with contextlib.suppress(Exception):
                    prof.stop()

    def _write(self, prof: profile) -> None:
        self._done = True
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=TABLE_ROWS)
        (self.out / f"rank{self.rank}.txt").write_text(table + "\n")
        self.written = trace
