"""Training signals: gradient and weight norms, learning rates, non-finite steps and throughput per epoch.

`TrainingSignals` is a callback. Each optimizer step it adds the squared gradient norm of every layer
group into device tensors (no host sync in the loop); at the end of the epoch one `.tolist()` turns
them into keys of the epoch's metrics.jsonl record (and therefore of W&B):

- `grad_norm/global` (mean over the epoch's steps), `grad_norm/global_max`, `grad_norm/<group>`
- `weight_norm/global`, `weight_norm/<group>` (at the end of the epoch)
- `lr/<param group name>` for every optimizer param group
- `nonfinite_step_fraction`: steps whose gradient norm was NaN or infinite
- `images_per_second`: training throughput from the epoch's start to its last optimizer step

Gradients are measured where the hook runs: after unscaling and after clipping (`train.max_grad_norm`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.training.callbacks import Callback

if TYPE_CHECKING:
    from pipeline.training.trainer import Trainer


def layer_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters grouped by top-level child module; one level deeper if that gives < 3 groups.

    simple_cnn gives features.0, features.1, ..., head.2; a ResNet gives conv1, bn1, layer1..layer4, fc.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for depth in (1, 2):
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, param in named:
            key = ".".join(name.split(".")[:depth]) if name.count(".") >= depth else name.rsplit(".", 1)[0]
            groups.setdefault(key or name, []).append((name, param))
        if len(groups) >= 3:
            return groups
    return groups


class TrainingSignals(Callback):
    """Adds gradient/weight norms, learning rates, non-finite step fraction and images/s to each epoch record."""

    name = "training_signals"

    def __init__(self) -> None:
        self.groups: dict[str, list[torch.Tensor]] = {}
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # [sum of group norms..., sum global, max global, nonfinite, steps]
        self.started = 0.0
        self.last_step = 0.0
        self._matrices: dict[tuple[int, ...], torch.Tensor] = {}

    def on_fit_start(self, trainer: "Trainer") -> None:
        grouped = layer_groups(trainer.unwrapped)
        self.names = list(grouped)
        self.groups = {k: [p for _, p in v] for k, v in grouped.items()}

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        restored = getattr(self, "_restored", None)
        self.sums = torch.zeros(len(self.names) + 4, device=trainer.dist.device)
        if restored is not None and len(restored) == len(self.sums):  # resumed mid-epoch: keep what was summed
            self.sums = torch.tensor(restored, dtype=self.sums.dtype, device=self.sums.device)
        self._restored = None
        self.started = self.last_step = time.perf_counter()

    def state_dict(self) -> dict:
        """Partial-epoch sums, so a run resumed mid-epoch logs exactly what an uninterrupted one does."""
        return {"sums": self.sums.tolist()} if getattr(self, "sums", None) is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state.get("sums")

    def on_before_optimizer_step(self, trainer: "Trainer") -> None:
        if self.sums is None:
            return
        # One norm kernel over every gradient, then a [groups x grads] 0/1 matrix sums the squares per
        # group (deterministic, unlike index_add_ on CUDA); a few kernels per step whatever the model.
        grads, counts = [], []
        for name in self.names:
            group = [p.grad for p in self.groups[name] if p.grad is not None]
            grads += group
            counts.append(len(group))
        n = len(self.names)
        if grads:
            norms = torch.stack(torch._foreach_norm(grads, dtype=torch.float32))
            squares_t = self._group_matrix(tuple(counts), norms.device) @ norms.square()
        else:
            squares_t = torch.zeros(n, device=self.sums.device)
        global_norm = squares_t.sum().sqrt()
        finite = torch.isfinite(global_norm)
        # Non-finite steps are counted, not averaged in, so one NaN step does not hide the epoch's norms.
        update = torch.cat([torch.where(finite, squares_t.sqrt(), 0.0), torch.where(finite, global_norm, 0.0)[None]])
        self.sums[:n + 1] += update
        self.sums[n + 1] = torch.maximum(self.sums[n + 1], torch.where(finite, global_norm, self.sums[n + 1]))
        self.sums[n + 2:] += torch.stack([(~finite).float(), torch.ones_like(global_norm)])
        self.last_step = time.perf_counter()

    def _group_matrix(self, counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Row g has ones at the positions of group g's gradients; cached per set of present gradients."""
        cache = self._matrices
        if counts not in cache:
            matrix = torch.zeros(len(counts), sum(counts))
            start = 0
            for row, count in enumerate(counts):
                matrix[row, start:start + count] = 1.0
                start += count
            cache[counts] = matrix.to(device)
        return cache[counts]

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        if self.sums is None:
            return
        n = len(self.names)
        with torch.no_grad():
            weights = torch.stack([torch.stack(torch._foreach_norm([p.detach().float() for p in self.groups[k]]))
                                   .square().sum().sqrt() for k in self.names])
        values = torch.cat([self.sums, weights]).tolist()  # the one host sync of this callback per epoch
        steps = max(values[n + 3], 1.0)
        finite_steps = max(values[n + 3] - values[n + 2], 1.0)
        record["grad_norm/global"] = values[n] / finite_steps
        record["grad_norm/global_max"] = values[n + 1]
        for i, name in enumerate(self.names):
            record[f"grad_norm/{name}"] = values[i] / finite_steps
        weight_norms = values[n + 4:]
        record["weight_norm/global"] = sum(w * w for w in weight_norms) ** 0.5
        for name, value in zip(self.names, weight_norms):
            record[f"weight_norm/{name}"] = value
        for index, group in enumerate(trainer.optimizer.param_groups):
            record[f"lr/{group.get('name', index)}"] = group["lr"]
        record["nonfinite_step_fraction"] = values[n + 2] / steps
        images = trainer.train_data.stream.samples_per_epoch() * trainer.dist.world_size
        seconds = max(self.last_step - self.started, 1e-9)
        record["images_per_second"] = images / seconds
        self.sums = None
