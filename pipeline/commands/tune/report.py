"""What a study leaves in its folder: best_config.yaml, summary.md, trials.csv, study.json and two plots."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.commands.tune.space import apply_overrides
from pipeline.commands.tune.storage import mask_url
from pipeline.config import Config, to_yaml
from pipeline.config.schema import TuneConfig


def _write(path: Path, text: str) -> None:
    """Atomic: readers (and other workers) never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _sorted(trials: list[FrozenTrial], direction: str) -> list[FrozenTrial]:
    """Completed trials best first, then the others by number."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    done.sort(key=lambda t: t.value, reverse=direction == "maximize")
    return done + sorted((t for t in trials if t not in done), key=lambda t: t.number)


def _duration(trial: FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)
    return None


def summary_rows(study: optuna.Study, direction: str) -> list[dict]:
    rows = []
    for t in _sorted(study.get_trials(deepcopy=False), direction):
        last_epoch = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "epochs": last_epoch,
                     "seconds": _duration(t), **{k: v for k, v in t.user_attrs.get("overrides", {}).items()}})
    return rows


def _markdown(rows: list[dict], metric: str) -> str:
    keys = sorted({k for r in rows for k in r} - {"number", "state", "value", "epochs", "seconds"})
    header = ["trial", "state", metric, "epochs", "seconds", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["number"], r["state"], "" if r["value"] is None else f"{r['value']:.4f}",
                 r["epochs"] if r["epochs"] is not None else "", r["seconds"] if r["seconds"] is not None else "",
                 *[_fmt(r.get(k)) for k in keys]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plots(study: optuna.Study, study_dir: Path, metric: str, direction: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    if done:
        done.sort(key=lambda t: t.number)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([t.number for t in done], [t.value for t in done], label="complete", color="tab:blue")
        best, running = [], None
        for t in done:
            running = t.value if running is None else (max if direction == "maximize" else min)(running, t.value)
            best.append(running)
        ax.step([t.number for t in done], best, where="post", color="tab:red", label="best so far")
        for t in pruned:
            if t.intermediate_values:
                ax.scatter([t.number], [t.intermediate_values[max(t.intermediate_values)]], marker="x",
                           color="tab:gray", label="pruned (last report)" if t is pruned[0] else None)
        ax.set_xlabel("trial")
        ax.set_ylabel(metric)
        ax.set_title(f"optimisation history: {study.study_name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(study_dir / "optimization_history.png", dpi=100)
        plt.close(fig)
        written.append("optimization_history.png")
    importances = _importances(study)
    if importances:
        names = list(importances)[::-1]
        fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
        ax.barh(names, [importances[n] for n in names], color="tab:green")
        ax.set_xlabel(f"importance for {metric} (fANOVA)")
        ax.set_title("parameter importances")
        fig.tight_layout()
        fig.savefig(study_dir / "param_importances.png", dpi=100)
        plt.close(fig)
        written.append("param_importances.png")
    return written


def _importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances; empty while too few completed trials vary their parameters."""
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return {}


def write_report(study: optuna.Study, tune: TuneConfig, base: Config) -> dict:
    """Write the study folder's summary files; return the study.json content."""
    study_dir = tune.study_dir
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    rows = summary_rows(study, tune.direction)
    summary: dict = {"study_name": tune.study_name, "storage": mask_url(tune.storage_url()),
                     "metric": tune.metric, "direction": tune.direction, "n_trials": len(trials),
                     "states": counts, "numbers": sorted(t.number for t in trials)}
    buffer = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    _write(study_dir / "trials.csv", buffer.getvalue())
    text = [f"# Study {tune.study_name}\n", f"{len(trials)} trials: " +
            ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; sampler {tune.sampler}, pruner {tune.pruner}\n"]
    best = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if best:
        trial = study.best_trial
        overrides = trial.user_attrs.get("overrides", {})
        cfg = apply_overrides(base, overrides, name=f"{tune.study_name}-best")
        header = (f"# Best trial {trial.number} of study '{tune.study_name}': {tune.metric}={trial.value:.6f}\n"
                  f"# Parameters: {json.dumps(overrides)}\n"
                  f"# Retrain: pipeline train {study_dir / 'best_config.yaml'}\n")
        _write(study_dir / "best_config.yaml", header + to_yaml(cfg))
        summary.update(best_trial=trial.number, best_value=trial.value, best_overrides=overrides)
        text.append(f"Best: trial {trial.number}, {tune.metric} = {trial.value:.4f}, {overrides}  \n"
                    f"Retrain it: `pipeline train {study_dir / 'best_config.yaml'}`\n")
    text.append("\n" + _markdown(rows, tune.metric))
    plots = _plots(study, study_dir, tune.metric, tune.direction)
    text += [f"\n![{p}]({p})\n" for p in plots]
    summary["plots"] = plots
    _write(study_dir / "summary.md", "".join(text))
    _write(study_dir / "study.json", json.dumps(summary, indent=2) + "\n")
    print(console_text("".join(text), study_dir), flush=True)
    return summary


def console_text(markdown: str, study_dir: Path) -> str:
    """summary.md for a terminal: no heading marks, code marks or Markdown line breaks, and each plot as its path."""
    lines = []
    for line in markdown.splitlines():
        image = re.fullmatch(r"!\[[^\]]*\]\(([^)]+)\)", line.strip())
        if image:
            lines.append(f"plot: {study_dir / image.group(1)}")
            continue
        lines.append(line.removeprefix("# ").replace("`", "").rstrip())
    return "\n".join(lines).strip("\n") + "\n"
