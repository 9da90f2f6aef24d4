"""What every `mm1` command module shares: the console and the way commands are added."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Protocol

from rich.console import Console

# soft_wrap: long lines (Markdown tables, commands to copy) are never broken by inserted newlines,
# which piped output (80 columns) would otherwise get.
console = Console(soft_wrap=True)

MODEL_HELP = (
    "a run directory, one of its checkpoints (RUN/checkpoints/step_N), an export, or a "
    "transformers LLaVA / LLaVA-NeXT / Fuyu directory"
)
RESHARD_HELP = (
    "resume a checkpoint saved by another number of processes: model and optimizer resharded, "
    "the data restarted in a new shuffle (records may repeat)"
)


# The commands that share their work among torchrun's ranks (few-shot eval its batches); any
# other would run whole on every rank, each writing the same files.
TORCHRUN_COMMANDS = ("train", "train-encoder", "eval")


def refuse_torchrun(what: str) -> None:
    """A ConfigError under torchrun (`WORLD_SIZE` > 1) for `what`, which runs in one process."""
    from mm1.config import ConfigError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{what} runs in one process: start it without torchrun (torchrun runs "
            f"{', '.join(TORCHRUN_COMMANDS)}; eval shares its few-shot batches among the ranks)"
        )


def first_rank() -> bool:
    """Whether this process is torchrun's first rank, or was not launched by torchrun: the one
    that prints what every rank would print alike."""
    return os.environ.get("RANK", "0") == "0"


class Add(Protocol):
    """`add(name, fn, help, on=subparsers)`: a (sub)command running `fn(args)`; its parser."""

    def __call__(
        self,
        name: str,
        fn: Callable[[argparse.Namespace], int | None],
        help: str,
        on: argparse._SubParsersAction | None = None,
    ) -> argparse.ArgumentParser: ...


def skipped_note(result: dict) -> str:
    """The end of a finished run's `done:` line: the steps skipped for a non-finite loss or
    gradient, if any (their updates were not applied)."""
    n = result.get("skipped_steps", 0)
    return f" ({n} step(s) skipped: non-finite loss or gradient)" if n else ""
