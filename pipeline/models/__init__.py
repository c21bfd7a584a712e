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


def _small_input_stem(model: nn.Module, name: str) -> None:
    """The CIFAR stem: conv1 becomes 3x3 stride 1 (padding 1), the max-pool is dropped."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        raise ValueError(f"model.small_input_stem=true needs a ResNet-style stem (conv1 + maxpool: resnet*, resnext*, "
                         f"wide_resnet*); {name} has none")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)
    model.maxpool = nn.Identity()


def torchvision_model_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def create_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """`simple_cnn` or any torchvision classification model (random init) with `num_classes` outputs."""
    if cfg.name == "simple_cnn":
        if cfg.small_input_stem:
            raise ValueError("model.small_input_stem=true is for torchvision ResNets; simple_cnn has no such stem")
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
        if cfg.small_input_stem:
            _small_input_stem(model, cfg.name)
        _adapt_first_conv(model, in_channels)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["SimpleCNN", "create_model", "torchvision_model_names"]
