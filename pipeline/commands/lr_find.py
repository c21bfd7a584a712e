"""`pipeline lr-find CONFIG [key=value ...]`: the learning-rate range test (pipeline.training.lr_finder) on the
config's model, optimizer and training loader; a plot, a JSON record and the line `optim.lr=<value>` to paste.

Nothing of a run is touched: the model is built fresh in this process and thrown away, no run folder is created
or written (the plot and its JSON go beside the run folder, `<run.output_dir>/<run.name>.lr_find.png`, or to
`--out`), no checkpoint is read or written. Under several ranks every rank sweeps its share of each batch, the
losses are averaged over the ranks, so all agree on where to stop and on the suggestion (checked), and the main
process alone writes the plot.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.data import build_loader
from pipeline.distributed import build_dist, choose_precision
from pipeline.distributed.sync_bn import convert_sync_batchnorm
from pipeline.models import create_model
from pipeline.run.data import load_manifest
from pipeline.run.preflight import preflight
from pipeline.tasks import build_task, class_weights
from pipeline.training.finetune import build_finetune, match_input
from pipeline.training.lr_finder import RULES, Sweep, SweepStep, run_sweep, sweep_lrs
from pipeline.training.optim import build_l1_penalty, build_optimizer
from pipeline.training.seed import seed_everything
from pipeline.training.threads import set_threads

PLOT_SUFFIX = ".lr_find.png"
RULE_WORDS = {"valley": "valley of the smoothed loss, fastai's rule for adaptive optimizers",
              "bottom": "bottom of the smoothed loss, Smith's one-cycle peak for SGD"}


@dataclass
class LRFound:
    sweep: Sweep
    plot: Path | None
    """Written by the main process only (None on the others)."""
    world_size: int


def plot_path(cfg: Config, out: str | None) -> Path:
    """--out, or <run.output_dir>/<run.name>.lr_find.png: beside the run folder, never inside it."""
    if out is None:
        return Path(cfg.run.output_dir) / f"{cfg.run.name}{PLOT_SUFFIX}"
    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"--out '{out}' must name a .png file (its .json record goes beside it)")
    return Path(out)


def write_plot(sweep: Sweep, path: Path, title: str) -> None:
    """Loss against lr (log axis): the raw losses, the smoothed curve, the suggestion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = sweep.record()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(sweep.lrs, sweep.losses, color="0.75", linewidth=1, label="loss of each step")
    ax.plot(sweep.lrs, sweep.smoothed, color="C0", linewidth=2, label="smoothed (EMA 0.98, bias-corrected)")
    other = "valley" if sweep.rule == "bottom" else "bottom"
    for key, style, label in (("suggestion", ("C3", "--"), f"suggestion ({sweep.rule})"),
                              (other, ("C2", ":"), other)):
        ax.axvline(record[key], color=style[0], linestyle=style[1], label=f"{label}: {record[key]:.3g}")
    ax.set_xscale("log")
    low, high = min(min(sweep.losses), min(sweep.smoothed)), sweep.smoothed[0]
    ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def lr_find(cfg: Config, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            out: str | None = None) -> LRFound:
    """Sweep (see the module docstring); returns the sweep and where its plot went."""
    lrs = sweep_lrs(start_lr, end_lr, steps)
    path = plot_path(cfg, out)
    cfg = match_input(cfg)
    precision, note = choose_precision(cfg.train.precision)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    gradual = cfg.finetune.freeze == "gradual"
    dist = build_dist(precision, cfg.train.cpu, find_unused_parameters=gradual, timeout_s=cfg.dist.timeout_s,
                      init_timeout_s=cfg.dist.init_timeout_s)
    if note:
        dist.print(note)
    set_threads(cfg.train.cpu_threads, cfg.data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seed_everything(cfg.train.seed)
    manifest = load_manifest(cfg, dist)
    preflight(cfg, dist, manifest, run_folder=False)
    train = build_loader(cfg, manifest, "train", dist.rank, dist.world_size, train=True,
                         pin_memory=dist.device.type == "cuda", device=dist.device)
    model = create_model(cfg.model, manifest.num_classes, cfg.data.channels)
    if cfg.model.sync_bn and dist.world_size > 1:
        model, _ = convert_sync_batchnorm(model, dist.device)
    finetune = build_finetune(cfg, model, None, dist.print, dist.is_main)  # no run folder: no pretrained_load.json
    optimizer = build_optimizer(cfg.optim, model, finetune.param_groups, fused=dist.device.type == "cuda")
    penalty = build_l1_penalty(cfg.optim, model)
    model, optimizer = dist.prepare(model, optimizer, register_frozen=gradual)
    model.train()
    loss_fn = build_task(cfg, manifest).build_loss(class_weights(cfg, manifest)).to(dist.device)  # as train's
    batch = f"batch {cfg.train.batch_size} x {dist.world_size} rank(s) x {cfg.train.grad_accum_steps} accumulated"
    dist.print(f"lr-find: up to {steps} {cfg.optim.name} steps, lr {start_lr:g} -> {end_lr:g} (exponential), "
               f"{batch}, on {manifest.split('train').num_samples} training samples")
    step = SweepStep(cfg, dist, model, optimizer, loss_fn, train, penalty)
    sweep = run_sweep(step, lrs, RULES[cfg.optim.name])
    suggestions = dist.gather_object(sweep.suggestion)
    if len(set(suggestions)) != 1:  # cannot happen: every rank saw the same averaged losses
        raise RuntimeError(f"lr-find: the ranks disagree on the suggestion: {suggestions}")
    plot = None
    if dist.is_main:
        title = f"{cfg.model.name}, {cfg.optim.name}, {batch}"
        write_plot(sweep, path, title)
        plot = path
    dist.barrier()
    return LRFound(sweep, plot, dist.world_size)


def summary_lines(found: LRFound) -> list[str]:
    """What `pipeline lr-find` prints; the last line is the override to paste."""
    record = found.sweep.record()
    return [f"swept {len(found.sweep.lrs)} steps up to lr {found.sweep.lrs[-1]:.3g}; stopped: {found.sweep.stopped}",
            f"suggestion: {record['suggestion']:.3g} ({RULE_WORDS[record['rule']]}); also: valley "
            f"{record['valley']:.3g}, bottom {record['bottom']:.3g}, steepest descent {record['steepest']:.3g}, "
            f"minimum {record['minimum']:.3g} (/10: {record['minimum_over_10']:.3g})",
            f"plot: {found.plot} (record: {found.plot.with_suffix('.json')})",
            f"optim.lr={record['suggestion']:.3g}"]


__all__ = ["LRFound", "lr_find", "plot_path", "summary_lines"]
