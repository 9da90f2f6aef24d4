"""Run logs: metrics.jsonl, TensorBoard, optional Weights & Biases, and a rich progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mm1.fs import atomic_write_text


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLogger:
    """Writes one JSON object per logged step (only on rank 0); mirrors scalars elsewhere.

    `start_step` is the step the run continues from. 0 is a run from scratch: ``metrics.jsonl``
    is truncated and earlier TensorBoard event files are removed, so an attempt that crashed
    before its first checkpoint leaves no duplicate steps behind."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: str = "off",
        config: dict[str, Any] | None = None,
        start_step: int = 0,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        self._progress: Progress | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fresh = not start_step
        if fresh:  # a run from scratch (e.g. after a crash before any checkpoint): no old records
            last = _last_logged_step(self.run_dir / "metrics.jsonl")
            if last:  # said, not done silently: its checkpoints may have been deleted by hand
                print(
                    f"{self.run_dir}: no complete checkpoint, so training starts at step 0; "
                    f"the metrics an earlier attempt logged (to step {last}) are replaced",
                    flush=True,
                )
            _remove_tensorboard_events(self.run_dir / "tensorboard")
        mode = "w" if fresh else "a"
        self._jsonl = open(self.run_dir / "metrics.jsonl", mode, buffering=1)  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # The writer's thread reports a full disk as a thread traceback of its own: kept
            # here instead, and raised by the next `log` as one error naming the folder.
            self._thread_error: OSError | None = None
            self._old_hook = threading.excepthook
            threading.excepthook = self._writer_thread_error

            # A resumed run logs its steps after `start_step` again: TensorBoard hides the
            # first attempt's events from there on (metrics.jsonl is truncated the same way).
            purge = start_step + 1 if start_step else None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        if wandb != "off":
            self._wandb = _start_wandb(wandb, self.run_dir, config)
        if progress:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, info="")
            self._progress.update(self._task, completed=start_step)
            self._progress.start()

    @contextlib.contextmanager
    def _naming_tensorboard(self) -> Iterator[None]:
        """TensorBoard re-raises its writer's error (a full disk) from the next call, naming no
        file: name its folder."""
        try:
            yield
        except OSError as err:
            raise _named(err, self.run_dir / "tensorboard") from None

    def _writer_thread_error(self, args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError):
            self._thread_error = args.exc_value
        else:
            self._old_hook(args)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        error = getattr(self, "_thread_error", None)
        if error is not None:
            raise _named(error, self.run_dir / "tensorboard")
        record = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
        except OSError as err:  # a write's error names no file: name it (a full disk, a quota)
            raise _named(err, Path(self._jsonl.name)) from None
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if self._tb is not None:
            with self._naming_tensorboard():
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def advance(self, step: int, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            if self._progress is not None:
                self._progress.stop()
            self._jsonl.close()
            if self._tb is not None:
                with self._naming_tensorboard():
                    self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
        finally:
            if self._tb is not None:
                threading.excepthook = self._old_hook


def _named(err: OSError, path: Path) -> OSError:
    """`err` naming `path` (the CLI prints `PATH: reason` in one line)."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def _last_logged_step(path: Path) -> int:
    """The step of the last record in a metrics file (0 for none or an unreadable one)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _remove_tensorboard_events(directory: Path) -> None:
    if directory.is_dir():
        for path in directory.glob("events.out.tfevents.*"):
            path.unlink(missing_ok=True)


def _start_wandb(mode: str, run_dir: Path, config: dict[str, Any] | None) -> Any:  # wandb.Run
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError(
            f"train.wandb={mode!r} but wandb is not installed: pip install wandb, or set "
            "train.wandb=off"
        ) from err
    # offline unless asked otherwise and credentials exist: never block a run on the network
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        mode = "offline"
    return wandb.init(dir=str(run_dir), mode=mode, config=config or {}, name=run_dir.name)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (an unfinished last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
