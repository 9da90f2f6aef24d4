"""Why a training run stopped before `train.steps`, as the CLI reports it: one line, exit 1.
Kept free of torch so the CLI can catch them without importing the trainer."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot go on, with the message a user acts on (no traceback)."""


class NonFiniteLossError(TrainingError):
    """Too many steps in a row had a non-finite loss or gradient (each was skipped)."""
