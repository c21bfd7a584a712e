"""Console output: rich progress bars and tables, shown on the main process only."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

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
_live: Console | None = None
"""The console a progress bar is drawn on while one is (see `progress_bar`)."""


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


def terminal_width() -> int | None:
    """Columns of the terminal stdout is, or None when it is piped or logged (lines are then never shortened)."""
    return console.width if console.is_terminal else None


def bar_console() -> Console | None:
    """Where a progress bar goes: the terminal stdout is (so the lines `console` prints are drawn above the bar by
    rich itself, not onto it), else stderr when that alone is the terminal (stdout piped to a log keeps clean
    lines); None when neither is a terminal (a transient bar would leave only blank lines)."""
    if console.is_terminal:
        return console
    stderr = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    return stderr if stderr.is_terminal else None


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | NullProgress]:
    """A rich progress bar, or a do-nothing one when disabled or not attached to a terminal."""
    global _live
    target = bar_console() if enabled else None
    if target is None or _live is not None:  # one live bar at a time (rich allows no nesting)
        yield NullProgress()
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), ImagesPerSecondColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=target, transient=True)
    with progress:
        original_add = progress.add_task
        progress.add_task = lambda *a, info="", **k: original_add(*a, info=info, **k)  # type: ignore[method-assign]
        _live = target
        try:
            yield progress
        finally:
            _live = None


def _above_bar(target: Console) -> Console:
    """`target`, or the console a live bar is drawn on when `target` is the terminal too: printed there, a line
    goes above the bar; printed straight to the terminal, it would land on the bar's line and wrap."""
    return _live if _live is not None and target is not _live and target.is_terminal else target


def warn(message: str) -> None:
    """One line on stderr; secrets in it are masked, brackets in it are text (not rich markup)."""
    from rich.markup import escape

    from pipeline.config.secrets import mask_text

    _above_bar(err_console).print(f"[yellow]warning:[/yellow] {escape(mask_text(message))}")


def epoch_line(record: dict, epochs: int, seconds: float, improved: bool, width: Optional[int] = None,
               headline: tuple[str, str] = ("val/accuracy", "val_acc")) -> str:
    """The line printed after each epoch: <= 100 characters while epochs < 1000, losses < 10 (cross-entropy starts at
    ln(classes)), throughput < 1M images/s and an epoch < 10,000 s. Given a terminal's `width`, it stays one row of
    it: the throughput, then the learning rate, are left out when it would wrap (both are in metrics.jsonl).
    `headline`: the task's (record key, label) shown after the validation loss (`pipeline.tasks`)."""
    speed = record.get("images_per_second")
    key, label = headline
    fields = {"epoch": f"epoch {record['epoch']}/{epochs}", "loss": f"loss {record['train/loss']:.4f}",
              "val_loss": f"val_loss {record['val/loss']:.4f}", "val_acc": f"{label} {record[key]:.4f}",
              "lr": f"lr {record['lr']:.1e}", "speed": f"{speed:.0f} img/s" if speed else "",
              "time": f"{seconds:.1f}s", "best": "best" if improved else ""}
    line = "  ".join(v for v in fields.values() if v)
    for droppable in ("speed", "lr"):
        if width is None or len(line) <= width:
            break
        fields[droppable] = ""
        line = "  ".join(v for v in fields.values() if v)
    return line
