"""task.type=regression: task.num_outputs numbers per image, one linear output each.

The model learns standardised targets, (y - mean) / std per output with the training split's mean and std (from
the shard index: `pipeline.data.dataset.index.target_stats`), so the loss (task.loss: mse, huber or l1) has the same
scale whatever the labels' units; `outputs` turns the model's values back into the labels' units, and everything people
see (metrics, predict, evaluate, the report) is in those units. mean and std are part of the task's state (each
checkpoint's state.json, <run>/task.json, the export sidecar). Metrics are torchmetrics': mae, rmse and r2 per
output, and their mean over the outputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.config.schema import TaskConfig
from pipeline.tasks.base import Task
from pipeline.training.losses import RegressionLoss


class RegressionMetrics:
    """mae, rmse, r2 (means over outputs) and per output, mean loss and sample count (synced over ranks); on the
    outputs in the labels' units."""

    def __init__(self, task: "Regression", device: torch.device | str = "cpu"):
        from torchmetrics import MeanMetric, MetricCollection, SumMetric  # here: see pipeline.evaluation.metrics
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

        count = len(task.classes)
        self.task = task
        self.collection = MetricCollection({
            "mae": MeanAbsoluteError(num_outputs=count),
            "rmse": MeanSquaredError(squared=False, num_outputs=count),
            "r2": R2Score(multioutput="raw_values"),
        }).to(device)
        self.loss, self.count = MeanMetric().to(device), SumMetric().to(device)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        values = self.task.outputs(logits)
        if values.shape[-1] == 1:  # torchmetrics' one-output metrics take 1-D inputs
            self.collection.update(values.squeeze(-1), target.float().squeeze(-1))
        else:
            self.collection.update(values, target.float())
        self.loss.update(loss.detach().float(), weight=len(target))
        self.count.update(torch.tensor(float(len(target)), device=target.device))

    def compute(self) -> dict:
        per = {k: v.reshape(-1).double() for k, v in self.collection.compute().items()}
        result = {k: float(v.mean()) for k, v in per.items()}
        result["per_output"] = [{"output": name, **{k: float(v[i]) for k, v in per.items()}}
                                for i, name in enumerate(self.task.classes)]
        return {**result, "loss": float(self.loss.compute()), "num_samples": int(self.count.compute())}

    def reset(self) -> None:
        for metric in (self.collection, self.loss, self.count):
            metric.reset()


class Regression(Task):
    type = "regression"
    output_rule = ("standardised values, one per output: value = output * task.std + task.mean, per "
                   "output")
    train_metric = "mae"
    headline = ("val/mae", "val_mae")
    test_keys = ("mae", "rmse", "r2", "per_output", "num_samples")
    class_word = "output"

    def __init__(self, outputs: Sequence[str], cfg: TaskConfig, stats: dict):
        super().__init__(outputs)
        self.cfg = cfg
        if cfg.standardize and not stats:
            raise ValueError("task.type=regression standardises targets with the training split's mean and std, and "
                             "the training data records none (give the shards as data.train/val/test with "
                             "data.label_key=json.<field>, or set task.standardize=false)")
        count = len(self.classes)
        self.mean = list(stats["mean"]) if cfg.standardize else [0.0] * count
        self.std = [s if s > 0 else 1.0 for s in stats["std"]] if cfg.standardize else [1.0] * count

    def counted(self) -> str:
        return f"{len(self.classes)} output(s), regression"

    def build_loss(self, class_weights: Sequence[float] | None) -> nn.Module:
        return RegressionLoss(self.cfg.loss, self.mean, self.std, self.cfg.huber_delta)

    def metrics(self, device: torch.device | str = "cpu") -> RegressionMetrics:
        return RegressionMetrics(self, device)

    def train_score(self, logits: torch.Tensor, targets) -> torch.Tensor:
        """Per image, the mean absolute error over the outputs in the labels' units, summed (train/mae)."""
        values = self.outputs(logits.detach())
        return (values - targets.targets(logits.shape[-1])).abs().mean(dim=-1).sum()

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=logits.device)
        std = torch.tensor(self.std, device=logits.device)
        return logits.float() * std + mean

    def describe(self, outputs: torch.Tensor, top_k: int) -> list[dict]:
        return [{"values": dict(zip(self.classes, row))} for row in outputs.tolist()]

    def analyse(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
        from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

        truth, values = labels.double().numpy(), outputs.double().numpy()
        rows = [{"output": name, "mae": float(mean_absolute_error(truth[:, i], values[:, i])),
                 "rmse": float(root_mean_squared_error(truth[:, i], values[:, i])),
                 "r2": float(r2_score(truth[:, i], values[:, i])),
                 "mean_true": float(truth[:, i].mean()), "mean_predicted": float(values[:, i].mean())}
                for i, name in enumerate(self.classes)]
        return {"per_output": rows}

    def state(self) -> dict:
        return {"type": self.type, "mean": list(self.mean), "std": list(self.std), "loss": self.cfg.loss}

    def load_state(self, state: dict) -> None:
        if len(state.get("mean", ())) == len(self.classes):
            self.mean, self.std = [float(v) for v in state["mean"]], [float(v) for v in state["std"]]
