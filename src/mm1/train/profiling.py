"""A `torch.profiler` window over a few training steps (`train.profile_at`, `train.profile_steps`).

Each rank writes `RUN/profile/steps_A-B/rank{R}.json`, a Chrome trace (open it in
https://ui.perfetto.dev or chrome://tracing), and `rank{R}.txt`, the operators by self time
(device time on a GPU). A step in the trace runs from the start of one step of the loop to the
start of the next: its data wait first, then the step, then the logging, validation or save
that follow it. The step before the window runs under the profiler too, unrecorded, so that
the window does not hold the profiler's own start-up (none where the window opens the run, or
the run resumes right at it); the trace numbers its steps from that one (`ProfilerStep#1` is
step A; `#0` without it). What a step computes is unchanged: the profiler only observes, and a
profile that cannot be written (a full disk) is a warning, not the end of the run. A window the
run ends inside is written as far as it got (named by the steps it holds); one a signal stops
is not written, since a long trace takes minutes to write and the run is asked to stop now.
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
NAME_WIDTH = 90


class StepProfiler:
    """Call `begin(step)` before each step (`step`: the one about to run, from 1) and `close()`
    when the loop ends, however it ends; each returns the trace's path once it is written."""

    def __init__(self, run_dir: Path, at: int, steps: int, rank: int, device: torch.device):
        self.first, self.last = at, at + steps - 1
        self.run_dir, self.rank, self.device = Path(run_dir), rank, device
        self._prof: profile | None = None
        self._begun = 0  # steps of the window begun so far
        self._discard = False
        self._settled = False  # profiled, dropped, failed or out of reach: said once
        self._lines: list[str] = []  # what became of the window, for the log
        self.written: Path | None = None  # the trace, until begin() / close() hands it over

    def steps(self, last: int | None = None) -> str:
        """The window (or its part up to `last`), as a log line names it."""
        last = self.last if last is None else last
        return f"step {self.first}" if self.first == last else f"steps {self.first}-{last}"

    def begin(self, step: int) -> Path | None:
        if self._prof is not None:
            self._guarded(self._prof.step)  # the step before this one ends
            if self.written is not None or self._prof is None:
                return self._finish()
            if self.first <= step <= self.last:
                self._begun += 1
            return None
        if self.first <= 0 or self._settled:
            return None
        if step > self.first:
            self._not_profiled(f"the run resumed at step {step - 1}, past its start")
            return None
        warmup = 1 if step < self.first else 0  # the step before, if it is still to run
        if step < self.first - warmup:
            return None
        self._start(warmup)
        self._begun = 1 - warmup
        return None

    def close(self, stopped_by_signal: bool = False) -> Path | None:
        """Stop profiling: a window the run ended inside is written as far as it got; one a
        signal cut short is dropped. Its trace's path, if not given before."""
        if self._prof is None:
            if self.first > 0 and not self._settled:
                self._not_profiled("the run ended before it")
            return self._finish()
        if stopped_by_signal:
            self._discard = True
            self._not_profiled("a signal stopped the run inside it; a trace is not written then")
        return self._finish()

    def report(self) -> str | None:
        """What became of the window since last asked (a line for the log), else None."""
        lines, self._lines = self._lines, []
        return "; ".join(lines) or None

    def _not_profiled(self, why: str) -> None:
        self._settled = True
        self._lines.append(f"train.profile_at={self.first}: {self.steps()} not profiled: {why}")

    def _start(self, warmup: int) -> None:
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        if not warmup:  # torch warns that the window has no warm-up, which is known here
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
        self._guarded(self._prof.start)

    def _finish(self) -> Path | None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            self._guarded(prof.stop)  # a window cut short is written here (unless discarded)
        written, self.written = self.written, None
        return written

    def _guarded(self, call: Callable[[], object]) -> None:
        """`call`, with any failure a warning (a profile never stops training)."""
        try:
            call()
        except Exception as err:
            log.warning("profiling %s failed, training goes on: %s", self.steps(), err)
            self._settled = True
            prof, self._prof = self._prof, None
            if prof is not None:
                with contextlib.suppress(Exception):
                    prof.stop()

    def _write(self, prof: profile) -> None:
        if self._discard:
            return
        last = self.first + max(self._begun, 1) - 1
        out = self.run_dir / PROFILE_DIR / f"steps_{self.first}-{last}"
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        table = averages.table(sort_by=key, row_limit=TABLE_ROWS, max_name_column_width=NAME_WIDTH)
        (out / f"rank{self.rank}.txt").write_text(table + "\n")
        self.written, self._settled = trace, True
        cut = "" if last == self.last else f" (the run ended inside {self.steps()})"
        self._lines.append(
            f"profiled {self.steps(last)}{cut}: {trace} (a Chrome trace: ui.perfetto.dev) and "
            "an operator table beside it, per rank"
        )
