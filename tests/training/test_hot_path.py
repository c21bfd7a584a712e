"""The training step's hot path: direct torch calls equal Accelerate's, no host syncs between log steps, fused."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.config.schema import OptimConfig, SchedulerConfig
from pipeline.models import SimpleCNN
from pipeline.training.optim import build_optimizer
from pipeline.training.schedulers import LRSchedule


def test_direct_step_is_accelerates_step_and_keeps_the_schedule_order() -> None:
    from benchmarks.common import fresh_accelerate_state
    from pipeline.distributed import build_dist

    fresh_accelerate_state()  # another test of this session may have chosen another precision
    dist = build_dist("fp32", cpu=True)
    assert dist._plain  # fp32, one process, no GradScaler: torch is called directly
    torch.manual_seed(0)
    fast = SimpleCNN(10, 1, (4, 8))
    slow = copy.deepcopy(fast)
    fast_opt, slow_opt = (torch.optim.AdamW(m.parameters(), lr=0.01) for m in (fast, slow))
    fast, fast_opt = dist.accelerator.prepare(fast, fast_opt)
    slow, slow_opt = dist.accelerator.prepare(slow, slow_opt)
    schedule = LRSchedule(SchedulerConfig(name="cosine"), fast_opt, steps_per_epoch=3, epochs=1, monitor_mode="max")
    loss_fn = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
            dist.backward(loss_fn(fast(images), labels))
            dist.optimizer_step(fast_opt)
            schedule.after_optimizer_step()
            dist.accelerator.backward(loss_fn(slow(images), labels))
            slow_opt.step()
            slow_opt.zero_grad(set_to_none=True)
            for group in slow_opt.param_groups:  # the same cosine lr by hand
                group["lr"] = fast_opt.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), slow.parameters()))
    assert all(p.grad is None for p in fast.parameters())
    assert schedule.scheduler.last_epoch == 3 and fast_opt.param_groups[0]["lr"] == 0.0


MIXING = ["data.augment.random_erasing=0.5", "data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0"]


@pytest.mark.parametrize("nonfinite, guard_reads, extra", [("ignore", 0, []), ("skip", 6, []), ("ignore", 0, MIXING),
                                                           ("ignore", 0, ["train.ema_decay=0.9"])],
                         ids=["ignore", "skip", "erasing+mixing", "ema"])  # EMA: its update reads nothing back
def test_no_host_sync_between_log_steps(digits_root: Path, tmp_path: Path, monkeypatch, nonfinite: str,
                                        guard_reads: int, extra: list[str]) -> None:
    from benchmarks.loop_overhead import PipelineLoop, make_batches

    cfg = load_config(None, [f"data.root={digits_root}", f"run.output_dir={tmp_path}", "model.channels=[4]",
                             "data.image_size=8", "train.batch_size=4", "logging.wandb_mode=disabled",
                             "logging.progress=false", "train.log_every_steps=3", "train.grad_accum_steps=2",
                             "train.max_grad_norm=1.0", f"train.nonfinite={nonfinite}", *extra])
    loop = PipelineLoop(cfg)
    loop.use(make_batches(cfg, 12, loop.device))
    calls = []  # host reads of tensors made by our code (torch's CPU-side optimizer step counters are not ours)
    for name in ("item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/pipeline/" in caller:
                calls.append((_name, Path(caller).name, loop.trainer.state.global_step, self.device.type))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    loop.block()
    # 12 micro-batches = 6 optimizer steps; the loss is read at steps 3 and 6 only. (The epoch-end reduction
    # and the training signals' epoch summary read the device once each, outside the step loop.) The non-finite
    # check, unless it is ignore, reads its two flags once per optimizer step: the update must not happen on NaN.
    # The bad-data check at log steps reads the fault counts the loader keeps on the CPU (no device sync).
    assert loop.trainer.state.global_step == 6
    assert [(n, f, s) for n, f, s, _ in calls if n == "item"] == [("item", "trainer.py", 3), ("item", "trainer.py", 6)]
    assert sum(1 for n, f, _, _ in calls if (n, f) == ("tolist", "nonfinite.py")) == guard_reads
    assert [n for n, f, _, _ in calls if f not in ("trainer.py", "nonfinite.py", "bad_data.py", "faults.py",
                                                     "__init__.py")] == []
    check = [(s, d) for n, f, s, d in calls if f in ("bad_data.py", "faults.py", "__init__.py")]
    assert check and {s for s, _ in check} == {3, 6} and {d for _, d in check} == {"cpu"}
    assert not any(n in ("cpu", "numpy") for n, f, _, _ in calls if f in ("trainer.py", "nonfinite.py"))
    loop.trainer.stop.uninstall()


def test_fused_optimizers_when_asked() -> None:
    model = SimpleCNN(3, 1, (2,))
    for name in ("sgd", "adam", "adamw"):
        assert build_optimizer(OptimConfig(name=name), model, fused=True).defaults["fused"] is True
        assert not build_optimizer(OptimConfig(name=name), model).defaults.get("fused")
    assert not build_optimizer(OptimConfig(name="rmsprop"), model, fused=True).defaults.get("fused")
