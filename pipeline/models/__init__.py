"""Models: architectures only. `create_model` turns the model config into a network."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.schema import ModelConfig
from pipeline.models.simple_cnn import SimpleCNN
from pipeline.models.timm_models import create_timm_model, is_timm_name


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


DROP_PATH_KWARG = "stochastic_depth_prob"


def _set_drop_path(model: nn.Module, name: str, drop_path: float, built_with_it: bool) -> None:
    """Check that `model` has stochastic depth; a builder that fixes its own probability (swin_*, maxvit_t: linear in
    depth up to it) gets every block's probability scaled so the deepest block's is `drop_path`."""
    from torchvision.ops import StochasticDepth

    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    if not layers:
        raise ValueError(f"model.drop_path is not taken by {name} (it has no stochastic depth); use simple_cnn with "
                         "model.residual=true, efficientnet_*, efficientnet_v2_*, convnext_*, swin_*, maxvit_t, or "
                         "model.drop_path=null")
    deepest = max(layer.p for layer in layers)
    if not built_with_it and deepest > 0:
        for layer in layers:
            layer.p = layer.p * drop_path / deepest


def _torchvision_model(name: str, kwargs: dict) -> tuple[nn.Module, bool]:
    """The model, and whether its builder took stochastic_depth_prob; unknown keyword arguments are dropped."""
    from torchvision import models

    while True:
        try:
            return models.get_model(name, weights=None, **kwargs), DROP_PATH_KWARG in kwargs
        except TypeError as exc:
            rejected = next((k for k in ("dropout", DROP_PATH_KWARG) if k in kwargs and k in str(exc)), None)
            if rejected is None:
                raise
            kwargs = {k: v for k, v in kwargs.items() if k != rejected}


def torchvision_model_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def create_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """`simple_cnn`, any torchvision classification model or `timm/<name>` (random init) with `num_classes`
    outputs."""
    if cfg.name == "simple_cnn":
        if cfg.small_input_stem:
            raise ValueError("model.small_input_stem=true is for torchvision ResNets; simple_cnn has no such stem")
        model: nn.Module = SimpleCNN(num_classes, in_channels, cfg.channels, cfg.residual, cfg.dropout,
                                     cfg.drop_path or 0.0)
    elif is_timm_name(cfg.name):
        model = create_timm_model(cfg.name, num_classes, in_channels, cfg.dropout, cfg.drop_path)
        if cfg.small_input_stem:
            _small_input_stem(model, cfg.name)
    else:
        from torchvision import models

        names = torchvision_model_names()
        if cfg.name not in names:
            raise ValueError(f"model.name={cfg.name!r} is not simple_cnn, a torchvision classification model "
                             f"(e.g. {', '.join(n for n in names if n.startswith('resnet'))}) or timm/<name>")
        kwargs: dict = {"num_classes": num_classes}
        if cfg.dropout and "dropout" in models.get_model_builder(cfg.name).__doc__.lower():
            kwargs["dropout"] = cfg.dropout
        if cfg.drop_path is not None:
            kwargs[DROP_PATH_KWARG] = cfg.drop_path
        model, took_drop_path = _torchvision_model(cfg.name, kwargs)
        if cfg.drop_path is not None:
            _set_drop_path(model, cfg.name, cfg.drop_path, took_drop_path)
        if cfg.small_input_stem:
            _small_input_stem(model, cfg.name)
        _adapt_first_conv(model, in_channels)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["SimpleCNN", "create_model", "torchvision_model_names"]
