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

from pipeline.run_folder import RunFolder

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


HEADLINES = {
    "classification": (("accuracy", "accuracy"), ("precision (macro)", "precision_macro"),
                       ("recall (macro)", "recall_macro"), ("F1 (macro)", "f1_macro"), ("AUROC", "auroc")),
    "multilabel": (("mAP (macro)", "map_macro"), ("F1 (micro)", "f1_micro"), ("F1 (macro)", "f1_macro"),
                   ("exact match", "exact_match"), ("Hamming loss", "hamming_loss")),
    "regression": (("MAE", "mae"), ("RMSE", "rmse"), ("R2", "r2")),
}
"""The headline numbers of each task.type (label, metrics key); regression's are means over the outputs."""
DETAIL_COLUMNS = {
    "multilabel": ("per_class", (("class", "class"), ("AP", "ap"), ("precision", "precision"), ("recall", "recall"),
                                 ("F1", "f1"), ("support", "support"), ("threshold", "threshold"))),
    "regression": ("per_output", (("output", "output"), ("MAE", "mae"), ("RMSE", "rmse"), ("R2", "r2"),
                                  ("mean true", "mean_true"), ("mean predicted", "mean_predicted"))),
}
"""Per class (multilabel) or per output (regression): the metrics key of the rows and the columns shown."""


def task_of(metrics: dict) -> str:
    """The task.type a metrics dict is of (classification records none)."""
    return metrics.get("task", {}).get("type", "classification")


def _headline(metrics: dict, title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2, 0, 0))
    for label, key in HEADLINES[task_of(metrics)]:
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


def _detail_table(metrics: dict, title: str) -> Table | None:
    """multilabel: per class AP, P/R/F1, support, threshold; regression: per output MAE, RMSE, R2 (what is there)."""
    if task_of(metrics) not in DETAIL_COLUMNS:
        return None
    key, columns = DETAIL_COLUMNS[task_of(metrics)]
    shown = [(label, name) for label, name in columns if all(name in row for row in metrics.get(key, []))]
    table = Table(title=title, title_justify="left")
    for index, (label, _) in enumerate(shown):
        table.add_column(label, justify="left" if index == 0 else "right")
    for row in metrics.get(key, []):
        table.add_row(*(escape(str(row[name])) if isinstance(row[name], str) else
                        str(row[name]) if isinstance(row[name], int) else f"{row[name]:.4f}" for _, name in shown))
    return table


def _task_summary(metrics: dict, title: str, console: Console) -> None:
    """The headline and detail of a multilabel or regression evaluation."""
    console.print(_headline(metrics, title))
    state = metrics.get("task", {})
    if "thresholds" in state and "per_class" not in metrics:
        console.print("thresholds" + (" (tuned on val)" if state.get("tuned") else "") + ": " +
                      ", ".join(f"{t:.2f}" for t in state["thresholds"]))
    detail = _detail_table(metrics, "per class" if task_of(metrics) == "multilabel" else "per output")
    if detail is not None and detail.row_count:
        console.print(detail)


def print_training_summary(metrics: dict, classes: Sequence[str], console: Console | None = None) -> None:
    """Test accuracy, macro P/R/F1, AUROC, samples and the worst classes by F1 (multilabel and regression: their
    headline numbers and, for regression, the table per output)."""
    console = console or Console(highlight=False)
    if task_of(metrics) != "classification":
        return _task_summary(metrics, "test (best weights)", console)
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
    run = RunFolder(run_dir)
    best, last_state = run.checkpoint("best"), run.checkpoint("last") / "state.json"
    lines = []
    try:
        early = json.loads((best / "state.json").read_text())["early_stopping"]
        epochs = json.loads(last_state.read_text())["train"]["epoch"] if last_state.is_file() else early["best_epoch"]
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
    """The headline numbers, top-k and ECE, the per-class table and the confusion matrix as a grid (multilabel: per
    class AP, P/R/F1, support and threshold; regression: per output MAE, RMSE, R2 and means)."""
    console = console or Console(highlight=False)
    if task_of(metrics) != "classification":
        _task_summary(metrics, f"{split} split", console)
        console.print(f"loss {metrics['loss']:.4f}" + "".join(f"  {k} labels per image {v:.2f}" for k, v in
                                                            metrics.get("labels_per_image", {}).items()))
        return
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
