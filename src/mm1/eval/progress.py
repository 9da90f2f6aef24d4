"""The few-shot evaluation's progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FewShotProgress:
    """A rich progress bar over all generations (or nothing); yields advance(n, label)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._bar: Any = None

    def __enter__(self) -> Callable[[int, str], None]:
        if not self.enabled:
            return lambda n, label: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]few-shot eval[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._bar.start()
        job = self._bar.add_task("", total=self.total)

        def advance(n: int, label: str) -> None:
            self._bar.update(job, advance=n, description=label)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
