"""What every `mm1` command module shares: the console and the way commands are added."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from rich.console import Console

if TYPE_CHECKING:
    from mm1.models.generation import Sampling

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


def add_image_sampling_arguments(p: argparse.ArgumentParser, which: str) -> None:
    """How image codes are drawn (`which`: the families it applies to, or "")."""
    pre = f"{which}: " if which else ""
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help=f"{pre}sample the codes at this temperature (0: greedy)",
    )
    p.add_argument("--top-k", type=int, default=0, help=f"{pre}among the k likeliest codes")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help=f"{pre}classifier-free guidance: each code's logits u + G (c - u), c after the "
        "caption, u after no caption (1: none, the default; above 1 follows the caption more)",
    )
    p.add_argument("--seed", type=int, default=0, help=f"{pre}the sampling's seed")


def image_sampling(args: argparse.Namespace) -> tuple[Sampling, float]:
    """`add_image_sampling_arguments`' values, checked: the sampling and the guidance scale."""
    from mm1.config import ConfigError
    from mm1.models.generation import Sampling

    if args.temperature < 0 or args.top_k < 0 or (args.top_k and not args.temperature):
        raise ConfigError(
            f"--temperature {args.temperature} --top-k {args.top_k}: both >= 0, and --top-k "
            "samples, which needs --temperature > 0 (0: greedy)"
        )
    if not math.isfinite(args.guidance_scale):
        raise ConfigError(f"--guidance-scale {args.guidance_scale}: a number (1: no guidance)")
    sampling = Sampling(args.temperature > 0, args.temperature or 1.0, args.top_k)
    return sampling, args.guidance_scale


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
