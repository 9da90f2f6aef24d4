"""What every `mm1` command module shares: the console and the way commands are added."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console

from mm1.config import ConfigError

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


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`: where, and in what precision, a command runs a loaded model."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="the weights' and activations' precision: float32 (default), bfloat16 (bf16; half "
        "the memory, the usual choice on a GPU) or float16 (fp16); read straight into it",
    )


TEMPLATE_KWARGS_HELP = (
    "extra chat-template variables as a JSON object, as transformers' apply_chat_template takes "
    """them: '{"enable_thinking": false}' turns Qwen3's reasoning off"""
)


def template_kwargs(value: str | None, option: str = "--chat-template-kwargs") -> dict[str, Any]:
    """`--chat-template-kwargs`' JSON object (None: {}), or one line naming `option`."""
    if value is None:
        return {}
    try:
        kwargs = json.loads(value)
    except ValueError as err:
        raise ConfigError(
            f"{option}: not JSON ({err}); give an object, e.g. "
            """'{"enable_thinking": false}'"""
        ) from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{option}: a JSON object of template variables, not {value}")
    return kwargs


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
