"""A `torch.profiler` window over a few training steps (`train.profile_at`, `train.profile_steps`).

Each rank writes `RUN/profile/steps_A-B/rank{R}.json`, a Chrome trace (open it in
https://ui.perfetto.dev or chrome://tracing), and `rank{R}.txt`, the operators by self time
(device time on a GPU). The step before the window runs under the profiler too, unrecorded, so
that the window does not hold the profiler's own start-up. What a step does is unchanged: the
profiler only observes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"
TABLE_ROWS = 40


class StepProfiler:
    """Call `begin(step)` before each step (`step`: the one about to run, from 1) and `end()`
    after it; `close()` when the loop ends, however it ends (a window cut short by the end of
    the run or a signal is written as far as it got)."""

    def __init__(self, run_dir: Path, at: int, steps: int, rank: int, device: torch.device):
        self.first, self.last = at, at + steps - 1
        self.rank, self.device = rank, device
        self.out = Path(run_dir) / PROFILE_DIR / f"steps_{self.first}-{self.last}"
        self._prof: profile | None = None
        self.written: Path | None = None

    @property
    def steps(self) -> str:
        """The window, as a log line names it."""
        return (
            f"step {self.first}" if self.first == self.last else f"steps {self.first}-{self.last}"
        )

    @property
    def enabled(self) -> bool:
        return self.first > 0

    def begin(self, step: int) -> None:
        if not self.enabled or self._prof is not None or self.written is not None:
            return
        warmup = 1 if self.first > 1 else 0
        if step != self.first - warmup:
            return  # not yet, or a resume past the window's start: it is not profiled
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=warmup, active=self.last - self.first + 1),
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=True,
            acc_events=True,  # one window: nothing to clear between cycles
        )
        self._prof.start()

    def end(self) -> Path | None:
        """After a step; the trace's path once, after the window's last step wrote it."""
        if self._prof is None:
            return None
        self._prof.step()
        if self.written is None:
            return None
        self.close()
        return self.written

    def close(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

    def _write(self, prof: profile) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=TABLE_ROWS)
        (self.out / f"rank{self.rank}.txt").write_text(table + "\n")
        self.written = trace
