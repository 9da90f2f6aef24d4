"""What every `mm1` command module shares: the console and the way commands are added."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from rich.console import Console

console = Console()


class Add(Protocol):
    """`add(name, fn, help, on=subparsers)`: a (sub)command running `fn(args)`; its parser."""

    def __call__(
        self,
        name: str,
        fn: Callable[[argparse.Namespace], int | None],
        help: str,
        on: argparse._SubParsersAction | None = None,
    ) -> argparse.ArgumentParser: ...
