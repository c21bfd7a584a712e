"""Models: architectures only. `create_model` turns the model config into a network."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.schema import ModelConfig
from pipeline.models.simple_cnn import SimpleCNN


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give a torchvision model a first convolution that takes `in_channels` channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return


def torchvision_model_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def create_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """`simple_cnn` or any torchvision classification model (random init) with `num_classes` outputs."""
    if cfg.name == "simple_cnn":
        model: nn.Module = SimpleCNN(num_classes, in_channels, cfg.channels, cfg.residual, cfg.dropout)
    else:
        from torchvision import models

        names = torchvision_model_names()
        if cfg.name not in names:
            raise ValueError(f"model.name={cfg.name!r} is not simple_cnn or a torchvision classification model "
                             f"(e.g. {', '.join(n for n in names if n.startswith('resnet'))})")
        kwargs = {"num_classes": num_classes}
        if cfg.dropout and "dropout" in models.get_model_builder(cfg.name).__doc__.lower():
            kwargs["dropout"] = cfg.dropout
        try:
            model = models.get_model(cfg.name, weights=None, **kwargs)
        except TypeError:
            kwargs.pop("dropout", None)
            model = models.get_model(cfg.name, weights=None, **kwargs)
        _adapt_first_conv(model, in_channels)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["SimpleCNN", "create_model", "torchvision_model_names"]
