"""Results for people: the short table that ends `pipeline train` and the per-class tables of `pipeline evaluate`.

`--json` prints the metrics dict itself instead; these functions only format it (rich tables on stdout).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

WORST_CLASSES = 3
"""Classes listed under "worst classes" at the end of training (lowest F1 first)."""
MAX_GRID_CLASSES = 20
"""Up to this many classes the confusion matrix is printed as a grid; beyond, it is left to --json / the report."""


def per_class_rows(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support of every class from a confusion matrix (rows true, columns predicted)."""
    rows = []
    for i, name in enumerate(classes):
        support = sum(confusion[i])
        predicted = sum(row[i] for row in confusion)
        hit = confusion[i][i]
        precision = hit / predicted if predicted else 0.0
        recall = hit / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows


def _headline(metrics: dict, title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2, 0, 0))
    for label, key in (("accuracy", "accuracy"), ("precision (macro)", "precision_macro"),
                       ("recall (macro)", "recall_macro"), ("F1 (macro)", "f1_macro"), ("AUROC", "auroc")):
        table.add_row(label, f"{metrics[key]:.4f}")
    skipped = metrics.get("num_skipped", 0)
    table.add_row("samples", f"{metrics['num_samples']}" + (f" ({skipped} bad, left out)" if skipped else ""))
    return table


def _class_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in rows:
        table.add_row(escape(row["class"]), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    return table


def _confusion_grid(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Table:
    table = Table(title="confusion matrix (rows: true class, columns: predicted)", title_justify="left")
    table.add_column("true \\ pred", justify="left")
    for name in classes:
        table.add_column(escape(name), justify="right")
    for i, (name, row) in enumerate(zip(classes, confusion)):
        cells = (f"[bold]{n}[/bold]" if j == i else ("." if n == 0 else str(n)) for j, n in enumerate(row))
        table.add_row(escape(name), *cells)  # the diagonal in bold; "." for an empty cell, so errors stand out
    return table


def print_training_summary(metrics: dict, classes: Sequence[str], console: Console | None = None) -> None:
    """Test accuracy, macro P/R/F1, AUROC, samples and the worst classes by F1."""
    console = console or Console(highlight=False)
    console.print(_headline(metrics, "test (best weights)"))
    rows = per_class_rows(metrics["confusion_matrix"], classes)
    worst = sorted(rows, key=lambda r: (r["f1"], r["class"]))[:WORST_CLASSES]
    console.print(_class_table(worst, f"worst {len(worst)} of {len(rows)} classes (by F1)"))


def _duration(seconds: float) -> str:
    """'42s', '3m 05s', '2h 07m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def run_end_lines(run_dir: Path, monitor: str, seconds: float) -> list[str]:
    """What a finished run did and what to do next: the best epoch and its monitored value (from the best
    checkpoint's early-stopping state), the wall time, where the best weights are, and the commands that use them."""
    best = run_dir / "checkpoints" / "best"
    lines = []
    try:
        early = json.loads((best / "state.json").read_text())["early_stopping"]
        epochs = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["train"]["epoch"] \
            if (run_dir / "checkpoints" / "last" / "state.json").is_file() else early["best_epoch"]
        lines.append(f"best epoch {early['best_epoch']} of {epochs}: {monitor} {early['best']:.4f}  |  "
                     f"wall time {_duration(seconds)}")
    except (OSError, KeyError, ValueError):
        lines.append(f"wall time {_duration(seconds)}")
    if not best.is_dir():
        return lines
    quoted = shlex.quote(str(run_dir))
    return [*lines, f"best weights: {best}", "next:",
            f"  pipeline evaluate {quoted}  # per-class table, confusion matrix",
            f"  pipeline report {quoted}  # report.html: curves, diagnosis, Grad-CAM",
            f"  pipeline export {quoted} --format onnx  # a deployable model, parity-checked",
            f"  pipeline predict {quoted} IMAGE...  # top-k classes of your images"]


def print_evaluation(metrics: dict, split: str, console: Console | None = None) -> None:
    """The headline numbers, top-k and ECE, the per-class table and the confusion matrix as a grid."""
    console = console or Console(highlight=False)
    console.print(_headline(metrics, f"{split} split"))
    extra = "  ".join(f"{k} {v:.4f}" for k, v in metrics.get("top_k", {}).items())
    console.print(f"{extra}  ECE {metrics['ece']:.4f}  loss {metrics['loss']:.4f}")
    rows = metrics["per_class"]
    console.print(_class_table(rows, "per class"))
    classes = [r["class"] for r in rows]
    if len(classes) <= MAX_GRID_CLASSES:
        console.print(_confusion_grid(metrics["confusion_matrix"], classes))
    else:
        console.print(f"confusion matrix: {len(classes)} x {len(classes)}, not shown (see --json or pipeline report)")
    confused = metrics.get("most_confused", [])
    pairs = ", ".join(escape(f"{p['true']} -> {p['predicted']} ({p['count']})") for p in confused)
    if pairs:
        console.print(f"most confused: {pairs}")
