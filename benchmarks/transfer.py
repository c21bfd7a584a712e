"""What the transfer experiments share (digits_transfer.py, cifar_transfer.py): one record per run, the
summary over seeds, the markdown table and the plot."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Sequence

from pipeline.config import Config, load_config

FROM_SCRATCH = ["finetune.weights=''", "finetune.freeze=full", "finetune.layer_decay=1.0"]


def pretrain_config(base: Config | str, source: Path, out: Path, overrides: Sequence[str] = ()) -> Config:
    """The source-task run (`<out>/pretrain_0to4`), from random weights."""
    return load_config(base, [f"data.root={source}", f"run.output_dir={out}", "run.name=pretrain_0to4",
                              "checkpoint.resume=never", *FROM_SCRATCH, *overrides])


def add_arguments(parser: argparse.ArgumentParser, config: str, out: str, shots: list[int], pretrain_epochs: int,
                  epochs: int) -> None:
    """The options both experiments take, with their defaults."""
    parser.add_argument("--config", default=config)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=shots, help="training images per class (several: "
                                                                            "one table row group each)")
    parser.add_argument("--pretrain-epochs", type=int, default=pretrain_epochs)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run (key=value, anywhere)")


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """key=value tokens are overrides wherever they stand, so they never land in --seeds/--shots."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = [*args.overrides, *overrides]
    return args


def add_run(results: dict, shots: int, method: str, metrics: dict, seconds: float) -> None:
    """Record one fine-tuning run's test metrics under results["shots"][shots][method]."""
    record = results["shots"].setdefault(shots, {}).setdefault(method, {"accuracy": [], "test_samples": [],
                                                                       "seconds": []})
    record["accuracy"].append(float(metrics["accuracy"]))
    record["test_samples"].append(int(metrics["num_samples"]))
    record["seconds"].append(round(seconds, 1))


def finish(results: dict, out: Path, xlabel: str, title: str) -> dict:
    """Mean and std over seeds; write transfer_results.json, .md (the table) and .png (the plot)."""
    for methods in results["shots"].values():
        for record in methods.values():
            record["mean"] = statistics.fmean(record["accuracy"])
            record["std"] = statistics.stdev(record["accuracy"]) if len(record["accuracy"]) > 1 else 0.0
    (out / "transfer_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "transfer_results.md").write_text("\n".join(table(results)) + "\n")
    plot(results, out / "transfer_results.png", xlabel, title)
    return results


def table(results: dict) -> list[str]:
    rows = ["| images/class | method | test accuracy (mean ± std) | vs scratch (points) | per seed | s/run |",
            "|---|---|---|---|---|---|"]
    for n, methods in results["shots"].items():
        scratch = methods.get("scratch", {}).get("mean")
        for method, r in methods.items():
            per_seed = ", ".join(f"{a:.3f}" for a in r["accuracy"])
            gain = f"{100 * (r['mean'] - scratch):+.1f}" if scratch is not None and method != "scratch" else ""
            rows.append(f"| {n} | {method.replace('_', ' ')} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} % | "
                        f"{gain} | {per_seed} | {statistics.fmean(r['seconds']):.0f} |")
    return rows


def plot(results: dict, path: Path, xlabel: str, title: str) -> None:
    """Test accuracy against training images per class, mean ± std over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted(results["shots"], key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in results["shots"][shots[0]]:
        means = [100 * results["shots"][n][method]["mean"] for n in shots]
        stds = [100 * results["shots"][n][method]["std"] for n in shots]
        ax.errorbar([int(n) for n in shots], means, yerr=stds, marker="o", capsize=3, label=method.replace("_", " "))
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([int(n) for n in shots], [str(n) for n in shots])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}, {len(results['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
