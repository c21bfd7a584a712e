"""Test-time augmentation (eval.tta): the model's logits averaged over fixed views of each image.

`flip` averages the image and its mirror; `flip_shift` is airbench's (KellerJordan/cifar10-airbench, `infer` with
tta_level=2): half the flip average of the image, a quarter each the flip average of the image shifted one pixel
up-left and one pixel down-right (reflection padding), i.e. weights 1/4, 1/4, 1/8 x 4. Logits, not probabilities,
are averaged, as airbench does. Used by the final test, `pipeline evaluate` and `pipeline predict` (also around an
exported model, from its sidecar); validation during training stays plain.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def tta_views(images: torch.Tensor, mode: str) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of an NCHW batch; the weights sum to 1."""
    if mode == "none":
        return [(1.0, images)]
    if mode == "flip":
        return [(0.5, images), (0.5, images.flip(-1))]
    if mode == "flip_shift":
        height, width = images.shape[-2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :height, :width], padded[..., 2:, 2:]]
        return [(0.25, images), (0.25, images.flip(-1)),
                *[(0.125, view) for s in shifted for view in (s, s.flip(-1))]]
    raise ValueError(f"eval.tta={mode!r} is not valid; choose one of none, flip, flip_shift")


class TestTimeAugmentation(nn.Module):
    """`model` (a module or any function of a batch) with its logits averaged over `tta_views`."""

    __test__ = False  # not a pytest class

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], mode: str):
        super().__init__()
        tta_views(torch.zeros(1, 1, 2, 2), mode)  # an unknown mode fails here, not at the first batch
        self.model, self.mode = model, mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = None
        for weight, view in tta_views(images, self.mode):
            part = self.model(view).float() * weight
            logits = part if logits is None else logits + part
        return logits


def with_tta(model: Callable[[torch.Tensor], torch.Tensor], mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` itself for mode none, else wrapped in `TestTimeAugmentation`."""
    return model if mode == "none" else TestTimeAugmentation(model, mode)


__all__ = ["TestTimeAugmentation", "tta_views", "with_tta"]
