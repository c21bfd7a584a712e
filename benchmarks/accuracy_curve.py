"""Accuracy against wall time of one run, from its metrics.jsonl (e.g. the CIFAR-10 CPU recipe).

    python benchmarks/accuracy_curve.py runs/cifar10_cpu --wall-seconds 1321 --out docs/images/cifar10_cpu_curve.png

The x axis is the time spent in epochs (training plus validation: `epoch_seconds` summed), the y axis
the validation accuracy after each epoch; the final test accuracy (test_metrics.json) is marked at
`--wall-seconds`, the whole command's wall time (start-up and the test pass included) when given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


def curve(run: Path) -> list[tuple[float, float]]:
    """(minutes since the first epoch began, validation accuracy) after each epoch."""
    points, elapsed = [], 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/accuracy" in record and "epoch_seconds" in record:
            elapsed += record["epoch_seconds"]
            points.append((elapsed / 60, record["val/accuracy"]))
    if not points:
        raise ValueError(f"{run}/metrics.jsonl has no epoch records with val/accuracy and epoch_seconds")
    return points


def plot(run: Path, out: Path, wall_seconds: float | None = None, target: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve(run)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m for m, _ in points], [100 * a for _, a in points], marker="o", label="validation (5,000 held out)")
    test = run / "test_metrics.json"
    if test.is_file():
        accuracy = json.loads(test.read_text())["accuracy"]
        x = wall_seconds / 60 if wall_seconds else points[-1][0]
        where = " at the command's end" if wall_seconds else ""
        ax.scatter([x], [100 * accuracy], color="C3", zorder=3, label=f"test (10,000): {100 * accuracy:.1f}%{where}")
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"{100 * target:.0f}%")
    ax.set_xlabel("minutes")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: <run>/accuracy_curve.png)")
    parser.add_argument("--wall-seconds", type=float, default=None, help="the whole command's wall time")
    parser.add_argument("--target", type=float, default=None, help="draw this accuracy (0-1) as a line")
    args = parser.parse_args(argv)
    out = args.out or args.run / "accuracy_curve.png"
    plot(args.run, out, args.wall_seconds, args.target)
    for minutes, accuracy in curve(args.run):
        print(f"{minutes:6.1f} min  val {100 * accuracy:5.2f}%")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
