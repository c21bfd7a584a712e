"""Results for people: the short table that ends `pipeline train` and the per-class tables of `pipeline evaluate`.

`--json` prints the metrics dict itself instead; these functions only format it (rich tables on stdout).
"""

from __future__ import annotations

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
