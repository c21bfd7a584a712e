"""Console output: rich progress bars and tables, shown on the main process only."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # a warning stays one line


class NullProgress:
    """Stands in for rich.Progress when progress is off or on a non-main rank."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def remove_task(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | NullProgress]:
    """A rich progress bar, or a do-nothing one when disabled or not attached to a terminal/log."""
    if not enabled:
        yield NullProgress()
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=Console(file=sys.stderr), transient=True)
    with progress:
        original_add = progress.add_task
        progress.add_task = lambda *a, info="", **k: original_add(*a, info=info, **k)  # type: ignore[method-assign]
        yield progress


def warn(message: str) -> None:
    from rich.markup import escape

    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}")
