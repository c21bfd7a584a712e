"""Loop overhead: the pipeline's training loop versus a bare PyTorch loop (and Lightning, if installed).

    python benchmarks/loop_overhead.py [--steps 10] [--repeats 15] [--threads 1] [--cases fp32 ...] [key=value ...]

The pipeline side is a real `Trainer` built by `pipeline.commands.train.build_run` from the config
(schema defaults + BASE below + the case's and the command line's overrides); each timed block is
one call of `Trainer.train_epoch` over `--steps` in-memory micro-batches, so it includes everything
the loop does per step (`train_step`, accumulation windows, device-side epoch sums, callbacks such as
the training signals, checkpoint/stop checks, the epoch-end reduction). The bare loop trains a copy
of the same model with the same initial weights, optimizer (same class, param groups and flags),
LR schedule, loss, autocast precision, accumulation and clipping over the same batches. Blocks
alternate in one process; the figure is the median over repeats of the per-repeat time ratio (and,
less sensitive to a busy neighbour, the ratio of each loop's fastest block).
Writes JSON to benchmarks/results/loop_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    alternate,
    environment,
    fresh_accelerate_state,
    ratios,
    smoke_overrides,
    smoke_sizes,
    sync,
    table,
    write_json,
)

# A step that is not trivially small: SimpleCNN [32, 64, 128] on 64 RGB images of 32x32 (~25 ms on a CPU core).
BASE = ["model.name=simple_cnn", "model.channels=[32,64,128]", "data.image_size=32", "data.channels=3",
        "train.batch_size=64", "optim.name=adamw", "optim.weight_decay=0.05", "scheduler.name=cosine",
        "logging.wandb_mode=disabled", "logging.progress=false", "train.epochs=1000"]
CASES = {
    "fp32": [],
    "bf16_accum2_clip": ["train.precision=bf16", "train.grad_accum_steps=2", "train.max_grad_norm=1.0"],
    # Not run by default: a step so small (~1 ms) that the difference shows the fixed cost per step in microseconds.
    "tiny_fp32": ["model.channels=[8]", "data.image_size=8", "train.batch_size=8"],
}
DEFAULT_CASES = ["fp32", "bf16_accum2_clip"]
NUM_CLASSES = 10


class InMemorySplit:
    """Stands in for a SplitLoader: the same batches every epoch, already on the device."""

    class _Stream:
        epoch, history = 0, ()  # an epoch never continued from another layout (`pipeline.data.loader_state`)

        def __init__(self, steps: int, samples: int):
            self.steps, self.samples = steps, samples

        def steps_per_epoch(self) -> int:
            return self.steps

        def samples_per_epoch(self) -> int:
            return self.samples

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        from pipeline.data.samples import faults

        self.batches, self.step = batches, 0
        self.bad_samples = faults.BadSampleCounts()  # no bad samples in memory
        self.stream = self._Stream(len(batches), sum(len(labels) for _, labels in batches))

    def start_epoch(self, epoch: int) -> int:
        """Every epoch from its start, never continued from another layout (0 earlier layouts)."""
        self.step = 0
        return 0

    @property
    def loader(self):
        for batch in self.batches:  # the loader counts the batches it hands out, as SplitLoader does
            self.step += 1
            yield batch


def make_batches(cfg, steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return [(torch.randn(shape, generator=generator).to(device),
             torch.randint(0, NUM_CLASSES, (cfg.train.batch_size,), generator=generator).to(device))
            for _ in range(steps)]


class PipelineLoop:
    """The real Trainer; `block()` runs one epoch of `train_epoch` over the in-memory batches."""

    def __init__(self, cfg):
        from pipeline.commands.train import build_run

        fresh_accelerate_state()  # each case may use another precision
        self.run = build_run(cfg)
        self.trainer = self.run.trainer
        self.device = self.trainer.dist.device
        self.epoch = 0
        self.trainer.callbacks.on_fit_start(self.trainer)  # what fit() does before the first epoch
        self.trainer.stop.install()

    def use(self, batches: list) -> None:
        """Train on these batches (already on the device) instead of the configured loader."""
        self.trainer.train_data = InMemorySplit(batches)
        self.trainer.steps_per_epoch = len(batches)

    def block(self) -> int:
        self.trainer.state.step_in_epoch = 0
        self.trainer.train_epoch(self.epoch)
        self.epoch += 1
        return self.trainer.steps_per_epoch


class BareLoop:
    """What one would write by hand: forward, backward, clip, step, zero_grad, schedule; loss.item() at log steps."""

    def __init__(self, cfg, pipeline: PipelineLoop, batches):
        trainer = pipeline.trainer
        self.device = trainer.dist.device
        self.model = copy.deepcopy(trainer.unwrapped).to(self.device)
        optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        own = dict(zip(trainer.unwrapped.parameters(), self.model.parameters()))
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [own[p] for p in g["params"]]}
                  for g in optimizer.param_groups]
        accepted = inspect.signature(type(optimizer)).parameters
        self.optimizer = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, trainer.schedule.scheduler.lr_lambdas[0])
        self.loss_fn = trainer.loss_fn
        self.batches = batches
        self.accum, self.clip = cfg.train.grad_accum_steps, cfg.train.max_grad_norm
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        self.log_every = cfg.train.log_every_steps
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.step = 0

    def block(self) -> int:
        self.model.train()
        running = torch.zeros((), device=self.device)
        for index, (images, labels) in enumerate(self.batches):
            images = images.contiguous(memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                loss = self.loss_fn(self.model(images).float(), labels)
            (loss / self.accum).backward()
            running += loss.detach()
            if (index + 1) % self.accum == 0:
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                if self.step % self.log_every == 0:
                    running.item()
        float(running)  # the epoch's one host sync, as the pipeline's epoch-end reduction
        return len(self.batches)


def lightning_loop(cfg, pipeline: PipelineLoop, batches):
    """The same model/optimizer/settings under Lightning; None (with the reason printed) if it is not installed."""
    try:
        import lightning as L  # noqa: N812

        for name in ("lightning.pytorch", "lightning.fabric"):  # its start-up banners, per fit() call
            logging.getLogger(name).setLevel(logging.ERROR)
    except ImportError:
        try:
            import pytorch_lightning as L  # noqa: N812
        except ImportError:
            print("Lightning comparison skipped: neither `lightning` nor `pytorch_lightning` is importable "
                  "(pip install lightning to include it)")
            return None
    bare = BareLoop(cfg, pipeline, batches)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = bare.model

        def training_step(self, batch, batch_index):
            images, labels = batch
            return bare.loss_fn(self.model(images.contiguous(memory_format=bare.memory_format)).float(), labels)

        def configure_optimizers(self):
            return {"optimizer": bare.optimizer, "lr_scheduler": {"scheduler": bare.scheduler, "interval": "step"}}

    class Clock(L.Callback):
        """Times from the first batch's start to the last batch's end: Trainer/fit set-up is left out."""

        def on_train_batch_start(self, trainer, module, batch, batch_index):
            if batch_index == 0:
                sync(device)
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
            if batch_index == len(batches) - 1:
                sync(device)
                self.seconds = time.perf_counter() - self.started

    module, clock = Module(), Clock()
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[cfg.train.precision]
    device = pipeline.trainer.dist.device
    accelerator = "gpu" if device.type == "cuda" else "cpu"

    def block() -> tuple[int, float]:
        # One fit() of one epoch over the batches; the module, optimizer and schedule carry on between blocks.
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            max_epochs=1, accumulate_grad_batches=cfg.train.grad_accum_steps,
                            gradient_clip_val=cfg.train.max_grad_norm or None, num_sanity_val_steps=0,
                            log_every_n_steps=cfg.train.log_every_steps, callbacks=[clock])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        return len(batches), clock.seconds

    return block


def run_case(name: str, overrides: list[str], args) -> dict:
    from pipeline.config import load_config

    with tempfile.TemporaryDirectory(prefix="loop_overhead_") as tmp:
        # The data is never read (the batches are made in memory), but building a run checks data.root: the
        # digits demo, built there on first use.
        common = [f"data.root={tmp}/digits", "data.auto_prepare_digits=true", f"run.output_dir={tmp}/runs",
                  f"run.name={name}"]
        cfg = load_config(None, [*BASE, *common, *overrides, *args.overrides])
        cfg_plain = load_config(None, [*BASE, *common, *overrides, *args.overrides, "logging.training_signals=false",
                                       f"run.name={name}_plain"])
        if args.steps % cfg.train.grad_accum_steps:
            raise ValueError(f"--steps {args.steps} must be a multiple of train.grad_accum_steps")
        pipeline, plain = PipelineLoop(cfg), PipelineLoop(cfg_plain)
        device = pipeline.device
        batches = make_batches(cfg, args.steps, device)
        pipeline.use(batches)
        plain.use(batches)
        plain.trainer.unwrapped.load_state_dict(pipeline.trainer.unwrapped.state_dict())
        bare = BareLoop(cfg, pipeline, batches)
        contenders = {"bare PyTorch": bare.block, "pipeline": pipeline.block,
                      "pipeline (no training signals)": plain.block}
        if args.lightning:
            block = lightning_loop(cfg, pipeline, batches)
            if block is not None:
                contenders["Lightning"] = block
        print(f"case {name}: {cfg.model.name} {list(cfg.model.channels)}, batch {cfg.train.batch_size} x "
              f"{cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}, {cfg.train.precision}, "
              f"accumulation {cfg.train.grad_accum_steps}, clip {cfg.train.max_grad_norm}, {args.steps} steps/block, "
              f"device {device}")
        for run in contenders.values():  # warm-up: allocator, autocast caches, optimizer state
            run()
        per_step = alternate(contenders, args.repeats, device)
        pipeline.trainer.stop.uninstall()
        plain.trainer.stop.uninstall()
    ratio = ratios(per_step, "bare PyTorch")
    optimizer_steps = {"bare PyTorch": bare.step, "pipeline": pipeline.trainer.state.global_step,
                       "pipeline (no training signals)": plain.trainer.state.global_step}
    return {"model": cfg.model.name, "model_channels": list(cfg.model.channels), "batch_size": cfg.train.batch_size,
            "image_shape": [cfg.data.channels, cfg.data.image_size, cfg.data.image_size],
            "precision": cfg.train.precision, "grad_accum_steps": cfg.train.grad_accum_steps,
            "max_grad_norm": cfg.train.max_grad_norm, "optimizer": cfg.optim.name, "device": str(device),
            "steps_per_block": args.steps, "repeats": args.repeats,
            "ms_per_step": {k: statistics.median(v) * 1e3 for k, v in per_step.items()},
            "ms_per_step_all": {k: [t * 1e3 for t in v] for k, v in per_step.items()},
            "ratio_to_bare": ratio, "ratio_of_fastest_blocks": {k: min(v) / min(per_step["bare PyTorch"])
                                                                for k, v in per_step.items()},
            "optimizer_steps": optimizer_steps}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="micro-batches per timed block (default 10)")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per contender (default 15)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, with 2+ threads one busy core stalls "
                             "every op and the noise swamps a few-percent effect; 0 keeps torch's default)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--no-lightning", dest="lightning", action="store_false", help="skip Lightning")
    parser.add_argument("--out", default="benchmarks/results/loop_overhead.json")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every case (key=value)")
    args = smoke_sizes(parser.parse_args(argv), steps=2, repeats=1)
    args.overrides = smoke_overrides(args.overrides, ["model.channels=[8,16]", "data.image_size=8",
                                                      "train.batch_size=8"])
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "loop_overhead", "cases": {}, "environment": environment()}
    for name in args.cases:
        result["cases"][name] = run_case(name, CASES[name], args)
    rows = []
    for name, case in result["cases"].items():
        for contender, ms in case["ms_per_step"].items():
            rows.append([name, contender, f"{ms:.2f}", f"{case['ratio_to_bare'][contender]:.3f}",
                         f"{case['ratio_of_fastest_blocks'][contender]:.3f}"])
    print(table(["case", "loop", "ms/step (median)", "time ratio to bare (median of pairs)",
                 "ratio of fastest blocks"], rows))
    print(f"wrote {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
