"""model.sync_bn: BatchNorm statistics over the global batch of all ranks.

On GPUs this is torch's SyncBatchNorm. torch's refuses CPU tensors (and DDP refuses it in a CPU module), so CPU
ranks (gloo) get `CpuSyncBatchNorm`: the same maths in plain autograd: the batch mean and the biased variance come
from all-reduced sums (`torch.distributed.nn.functional.all_reduce`, whose backward all-reduces the gradients, so
each rank's input gradient includes the other ranks' losses, as torch's SyncBatchNorm backward computes it), and
the running statistics are updated with the unbiased global variance. Its state dict is BatchNorm's, so its
checkpoints load into the plain model that evaluate, predict and export build.
"""

from __future__ import annotations

import torch
import torch.distributed as distributed
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the batch of every rank of the default process group (any backend; meant for gloo)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and distributed.is_initialized() and distributed.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float()
        local_count = values.new_full((1,), input.numel() / input.shape[1])
        sums = all_reduce(torch.cat([values.sum(dims), local_count]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = values - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count  # two passes: no E[x^2] - E[x]^2 cancellation
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    """torch's convert_sync_batchnorm, with CpuSyncBatchNorm: the same parameters and buffers, shared."""
    converted = module
    if isinstance(module, _BatchNorm):
        converted = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _to_cpu_sync(child))
    return converted


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """Every BatchNorm of `model` as a synchronised one for `device` (call before wrapping it in DDP), and how many
    were converted."""
    count = sum(isinstance(m, _BatchNorm) for m in model.modules())
    if device.type == "cpu":
        return _to_cpu_sync(model), count
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), count


__all__ = ["CpuSyncBatchNorm", "convert_sync_batchnorm"]
