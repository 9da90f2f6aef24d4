"""Why a training run stopped before `train.steps`, as the CLI reports it: one line, exit 1.
Kept free of torch so the CLI can catch them without importing the trainer."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot go on, with the message a user acts on (no traceback)."""


class NonFiniteLossError(TrainingError):
    """Too many steps in a row had a non-finite loss or gradient (each was skipped)."""


class StoppedAgain(KeyboardInterrupt):
    """A second SIGTERM / SIGINT while a step still runs (a data wait, a hung collective): the
    run stops at once without saving, its last checkpoint kept; the CLI exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(
            f"signal {signum} again: stopped without saving (the last checkpoint is kept)"
        )
        self.signum = signum


class StoppedBySignal(Exception):
    """A stage of a longer command (the demo) was stopped by SIGTERM / SIGINT after saving:
    the command stops too, instead of evaluating a half-trained model."""

    def __init__(self, signum: int, step: int, steps: int, run_dir: str) -> None:
        super().__init__(f"signal {signum} at step {step} of {steps} in {run_dir}")
        self.signum, self.step, self.steps, self.run_dir = signum, step, steps, run_dir


def stop_if_signalled(result: dict, steps: int, run_dir: object) -> None:
    """Raise `StoppedBySignal` when `Trainer.fit`'s `result` says a signal stopped it."""
    if result.get("stopped_by"):
        raise StoppedBySignal(int(result["stopped_by"]), int(result["step"]), steps, str(run_dir))
