"""`pipeline train`: build everything from the config with small factories, train, test the best weights.

The modules that build the model, the trainer and the metrics (torchvision's, torchmetrics') are imported once the
checks have passed (`_build_rest`): a run refused for its data or its run folder exits in the time torch and
Accelerate take to load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from pipeline.checkpointing import Checkpointer
from pipeline.config import Config, to_yaml
from pipeline.data import Manifest, build_loader
from pipeline.data.samples.faults import SKIP_REASONS
from pipeline.distributed import Dist, build_dist, choose_precision
from pipeline.distributed.sync_bn import convert_sync_batchnorm
from pipeline.evaluation.tta import with_tta
from pipeline.run.data import load_manifest
from pipeline.run.guards import RunLock, check_resume, data_identity, record_start
from pipeline.run.preflight import preflight
from pipeline.run_folder import RunFolder
from pipeline.tracking.metrics_log import MetricsLog
from pipeline.tracking.tensorboard import Trackers, build_tensorboard
from pipeline.tracking.wandb_logger import build_tracker
from pipeline.training.accumulation import AccumulationWindows
from pipeline.training.ema import build_ema, short_run_warning
from pipeline.training.finetune import build_finetune, match_input
from pipeline.training.grad_stats import TrainingSignals
from pipeline.training.optim import build_optimizer
from pipeline.training.schedulers import LRSchedule
from pipeline.training.seed import seed_everything
from pipeline.training.threads import cpu_precision_warning, set_threads

if TYPE_CHECKING:
    from pipeline.tasks import Task
    from pipeline.training.trainer import Trainer


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


@dataclass
class Run:
    """Everything one training run is made of."""

    cfg: Config
    dist: Dist
    run_dir: Path
    manifest: Manifest
    trainer: Trainer
    task: Task
    """What is predicted (task.type): loss, metrics, outputs and their state (`pipeline.tasks`)."""
    lock: RunLock
    """The run folder's lock (held by the main process only), released when `train` ends, however it ends."""
    threads: str = ""
    """torch's intra-op threads in this process and why, for the start line (`pipeline.training.threads`)."""


def build_run(cfg: Config, callbacks: list | None = None) -> Run:
    cfg = match_input(cfg)
    precision, precision_note = choose_precision(cfg.train.precision)  # recorded resolved in config.yaml
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    if cfg.logging.training_signals:
        callbacks = [TrainingSignals(), *(callbacks or [])]
    gradual = cfg.finetune.freeze == "gradual"  # its trainable set grows during training: see Dist.prepare
    dist = build_dist(cfg.train.precision, cfg.train.cpu, find_unused_parameters=gradual, timeout_s=cfg.dist.timeout_s,
                      init_timeout_s=cfg.dist.init_timeout_s)
    if precision_note:
        dist.print(precision_note)
    threads = set_threads(cfg.train.cpu_threads, cfg.data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if dist.device.type == "cpu" and (slow := cpu_precision_warning(cfg.train.precision)):
        dist.print(slow)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    seed_everything(cfg.train.seed)
    run_dir = run_dir_of(cfg)
    manifest = load_manifest(cfg, dist)
    preflight(cfg, dist, manifest)  # shards present, batch fits, run folder writable (created here)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))  # once: config.yaml and the trackers
    config_yaml = to_yaml(resolved)
    lock = claim_run_folder(cfg, dist, run_dir, config_yaml, manifest)
    try:
        return dataclasses.replace(_build_rest(cfg, dist, run_dir, manifest, resolved, config_yaml, lock, callbacks,
                                               gradual),
                                   threads=threads)
    except BaseException:
        lock.release()
        raise


def claim_run_folder(cfg: Config, dist: Dist, run_dir: Path, config_yaml: str, manifest: Manifest) -> RunLock:
    """Lock the run folder, check a resume's config and data against its checkpoint (or that a fresh start writes
    over no earlier run), then record this start (main process; every rank gets the verdict). Nothing in the
    folder is written before the checks pass."""
    lock, problem = RunLock(run_dir), ""
    if dist.is_main:
        try:
            lock.acquire()
            record = check_resume(cfg, config_yaml, run_dir, dist.world_size, data_identity(manifest))
            record_start(run_dir, config_yaml, record, dist.world_size, evaluated_weights(cfg))
        except (ValueError, FileNotFoundError) as exc:
            lock.release()
            problem = str(exc)
    problem = dist.broadcast_object(problem)
    if problem:
        raise ValueError(problem)
    return lock


def _build_rest(cfg: Config, dist: Dist, run_dir: Path, manifest: Manifest, resolved: dict, config_yaml: str,
                lock: RunLock, callbacks: list | None, gradual: bool) -> Run:
    from pipeline.models import create_model
    from pipeline.tasks import build_task, class_weights
    from pipeline.training.trainer import Trainer

    pin = dist.device.type == "cuda"
    train = build_loader(cfg, manifest, "train", dist.rank, dist.world_size, train=True, pin_memory=pin,
                         device=dist.device)
    val = build_loader(cfg, manifest, "val", dist.rank, dist.world_size, train=False, pin_memory=pin,
                       device=dist.device)
    model = create_model(cfg.model, manifest.num_classes, cfg.data.channels)
    if cfg.model.sync_bn and dist.world_size > 1:  # before freezing hooks BatchNorm layers and DDP wraps them
        model, converted = convert_sync_batchnorm(model, dist.device)
        dist.print(f"model.sync_bn: {converted} BatchNorm layer(s) normalise over the batch of all "
                   f"{dist.world_size} ranks")
    finetune = build_finetune(cfg, model, run_dir, dist.print, dist.is_main)
    callbacks = [*finetune.callbacks, *(callbacks or [])]
    optimizer = build_optimizer(cfg.optim, model, finetune.param_groups, fused=dist.device.type == "cuda")
    model, optimizer = dist.prepare(model, optimizer, register_frozen=gradual)
    ema = build_ema(cfg.train, dist.accelerator.unwrap_model(model))  # on the device, before torch.compile
    if cfg.model.compile:
        model = torch.compile(model)
    steps_per_epoch = AccumulationWindows(train.stream.steps_per_epoch(), cfg.train.grad_accum_steps).optimizer_steps
    schedule = LRSchedule(cfg.scheduler, optimizer, steps_per_epoch, cfg.train.epochs, cfg.train.monitor_mode)
    if short_ema := short_run_warning(cfg.train, steps_per_epoch * cfg.train.epochs):
        dist.print(short_ema)
    task = build_task(cfg, manifest)
    loss_fn = task.build_loss(class_weights(cfg, manifest)).to(dist.device)
    log_cfg = cfg.logging
    tracker = Trackers([
        build_tracker(run_dir, log_cfg, cfg.run.name, resolved, dist.is_main),
        build_tensorboard(run_dir, log_cfg.tensorboard, dist.is_main)])
    trainer = Trainer(cfg, dist, model, optimizer, schedule, loss_fn, train, val, task.metrics(dist.device),
                      Checkpointer(RunFolder(run_dir).checkpoints, dist, cfg.checkpoint.keep_last, config_yaml,
                                   data_identity(manifest)),
                      MetricsLog(RunFolder(run_dir).metrics, enabled=dist.is_main), tracker, callbacks, ema,
                      task=task)
    return Run(cfg, dist, run_dir, manifest, trainer, task, lock)


def test_split(run: Run, split: str = "test") -> dict:
    """Evaluate the trainer's current (best) weights, the EMA copy when on, with eval.tta, on a split; counts every
    sample once."""
    from pipeline.evaluation.evaluate import evaluate, evaluation_record

    cfg, dist = run.cfg, run.dist
    data = build_loader(cfg, run.manifest, split, dist.rank, dist.world_size, train=False,
                        pin_memory=dist.device.type == "cuda", device=dist.device)
    trainer = run.trainer
    metrics = evaluate(with_tta(trainer.eval_model, cfg.eval.tta), data.from_start(), trainer.loss_fn,
                       run.task.metrics(dist.device), dist.device, dist.accelerator.autocast, cfg.model.channels_last)
    skipped = trainer.bad_data.collect(data, split)  # summed over ranks; bad samples are left out, not padded
    record = evaluation_record(metrics, skipped[f"data/{split}/skipped"],
                               {r: skipped[f"data/{split}/skipped/{r}"] for r in SKIP_REASONS}, run.task.test_keys)
    return {**record, "weights": trainer.ema.weights_name, "tta": cfg.eval.tta,
            **({"task": run.task.state()} if run.task.type != "classification" else {})}


def tune_task(run: Run) -> None:
    """Fit what the task fits on the validation split with the best weights (multilabel thresholds with
    task.threshold=tune): every rank gathers every rank's outputs and fits the same values."""
    if not run.task.tunes:
        return
    from pipeline.evaluation.evaluate import collect_predictions

    trainer, dist = run.trainer, run.dist
    outputs, labels = collect_predictions(trainer.eval_model, trainer.val_data.from_start(), dist.device,
                                          dist.accelerator.autocast, run.cfg.model.channels_last, run.task.outputs)
    parts = dist.gather_object((outputs, labels))
    dist.print(run.task.tune(torch.cat([o for o, _ in parts]), torch.cat([t for _, t in parts])))


def evaluated_weights(cfg: Config) -> str:
    """What validation, the best checkpoint and the test use, in words (the summary line, run_info.json)."""
    weights = (f"EMA weights (train.ema_decay={cfg.train.ema_decay:g})" if cfg.train.ema_decay > 0
               else "trained weights")
    return f"the {weights}" + (f", tested with eval.tta={cfg.eval.tta}" if cfg.eval.tta != "none" else "")


def train(cfg: Config, callbacks: list | None = None) -> dict:
    """Train per `cfg`, evaluate the best weights on the test split, write test_metrics.json."""
    run = build_run(cfg, callbacks)
    dist = run.dist
    # Two lines, each short enough for an 80-column terminal with a short run folder.
    dist.print(f"run folder: {run.run_dir}  |  {run.task.counted()}  |  "
               f"{run.trainer.steps_per_epoch} steps/epoch/rank")
    dist.print(f"{dist.world_size} process(es) on {dist.device.type}, {run.cfg.train.precision}, {run.threads}  |  "
               f"evaluates {evaluated_weights(run.cfg)}")
    try:
        run.trainer.fit()
        tune_task(run)
        metrics = test_split(run)
        if dist.is_main:
            from pipeline.tasks import write_task

            write_task(run.task, run.run_dir)
            RunFolder(run.run_dir).test_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
        run.trainer.bad_data.check()  # the test split too (the same totals, hence decision, on every rank)
        if dist.is_main:
            run.trainer.tracker.summary({f"test/{k}": v for k, v in metrics.items()})
            if cfg.report.enabled:
                from pipeline.commands.report import write_report

                path, seconds = write_report(run.run_dir, tracker=run.trainer.tracker)
                dist.print(f"report: {path} ({seconds:.1f}s)")
    finally:
        run.trainer.tracker.finish()
        run.lock.release()
    dist.barrier()
    return metrics


__all__ = ["Run", "build_run", "train"]
