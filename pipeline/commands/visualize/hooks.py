"""Forward hooks that capture layer outputs, and Grad-CAM. Hooks are always removed on exit."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name` (as in named_modules()); one-line error listing valid names otherwise."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        valid = [n for n in modules if n]
        shown = ", ".join(valid[:20]) + (f", ... ({len(valid)} in all)" if len(valid) > 20 else "")
        raise ValueError(f"layer {name!r} not found in the model; valid layers: {shown}")
    return modules[name]


def conv_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def default_feature_layers(model: nn.Module) -> list[str]:
    """The first and the last convolution: low-level edges and high-level parts."""
    convs = conv_layers(model)
    if not convs:
        raise ValueError("the model has no Conv2d layer to visualise")
    return list(dict.fromkeys([convs[0], convs[-1]]))


def first_conv_weight(model: nn.Module) -> torch.Tensor:
    return find_layer(model, conv_layers(model)[0]).weight.detach().float().cpu()


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores the outputs of the named layers (detached, on the CPU)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_module, _inputs, output, name=name):
            # clone: a following in-place op (ReLU(inplace=True)) must not change what was captured
            outputs[name] = output.detach().float().cpu().clone()
        handles.append(find_layer(model, name).register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def feature_maps(model: nn.Module, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named layers for `images` (eval mode, no grad); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with capture_outputs(model, names) as outputs, torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
    return dict(outputs)


def grad_cam(model: nn.Module, layer_name: str, images: torch.Tensor,
             targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM heat maps (N, H, W) in [0, 1] at the input's resolution, and the logits.

    The class is `targets` when given, else the predicted one. The map is ReLU(sum_k w_k A_k) where A is the
    layer's output and w_k the spatial mean of d(class score)/dA_k (Selvaraju et al., 2017).
    """
    layer = find_layer(model, layer_name)
    stored: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        stored["activation"] = output
        output.register_hook(lambda grad: stored.__setitem__("gradient", grad))

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # gradients flow even if every weight is frozen
            logits = model(images)
            chosen = logits.argmax(dim=-1) if targets is None else targets.to(logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, chosen[:, None]).sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    activation, gradient = stored["activation"].detach(), stored["gradient"].detach()
    if activation.ndim != 4:
        raise ValueError(f"Grad-CAM needs a layer with (N, C, H, W) output; {layer_name!r} gives "
                         f"{tuple(activation.shape)}")
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    model.zero_grad(set_to_none=True)
    return (cam / peak).cpu(), logits.detach().float().cpu()
