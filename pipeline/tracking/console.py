"""Console output: rich progress bars and tables, shown on the main process only."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # one message, one line


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


class ImagesPerSecondColumn(ProgressColumn):
    """Throughput of a task whose steps are batches: rich's measured steps/s times the task's `images_per_step`
    field (all ranks' images). Blank for tasks without that field (the epochs bar)."""

    def render(self, task: Task) -> Text:
        images = task.fields.get("images_per_step", 0)
        if not images or not task.speed:
            return Text("")
        return Text(f"{task.speed * images:,.0f} img/s")


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | NullProgress]:
    """A rich progress bar, or a do-nothing one when disabled or not attached to a terminal/log."""
    stderr = Console(file=sys.stderr)
    if not enabled or not stderr.is_terminal:  # piped or logged: a transient bar would leave only blank lines
        yield NullProgress()
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), ImagesPerSecondColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=stderr, transient=True)
    with progress:
        original_add = progress.add_task
        progress.add_task = lambda *a, info="", **k: original_add(*a, info=info, **k)  # type: ignore[method-assign]
        yield progress


def warn(message: str) -> None:
    """One line on stderr; secrets in it are masked, brackets in it are text (not rich markup)."""
    from rich.markup import escape

    from pipeline.config.secrets import mask_text

    err_console.print(f"[yellow]warning:[/yellow] {escape(mask_text(message))}")
