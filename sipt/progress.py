"""Progress bars (rich) that stay quiet when output is not a terminal or progress is disabled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def total(self, n: float | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=n)


@contextlib.contextmanager
def progress_bar(label: str, *, total: float | None = None, unit: str = "", enabled: bool = True) -> Iterator[_Bar]:
    if not enabled or not console.is_terminal:
        yield _Bar(None, None)
        return
    columns = [
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        yield _Bar(progress, progress.add_task(label, total=total))
