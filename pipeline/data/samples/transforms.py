"""torchvision transforms.v2 pipelines built from the data config.

`build_transform` is the whole per-image pipeline (PIL image -> normalised float tensor), used where
single images are fed (prediction). The shard loader runs the same steps in two halves so the
expensive part can run anywhere: `SampleAugment` draws every random parameter from the sample's
seed and applies the uint8 steps with those parameters (in a DataLoader worker, or on the training
device), and `normalize_batch` turns uint8 into normalised floats. Applied in that order they give
bit-for-bit what `build_transform` gives under the same seed. Automatic augmentation
(`data.augment.auto_augment`) is one more uint8 step with explicit parameters (`auto_augment.py`); random erasing
and MixUp/CutMix work on the normalised batch on the training device (`pipeline.training.mixing`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torchvision.transforms import v2

from pipeline.config.schema import DataConfig
from pipeline.data.samples.auto_augment import auto_augment_step


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside, restored afterwards: the draws of one sample or batch.

    Only the CPU generator is seeded (`torch.manual_seed` would also queue CUDA seeding, recording a stack trace
    per call: ~0.3 ms) and it is restored afterwards, so the caller's own randomness (dropout) is untouched.
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _mean_std(cfg: DataConfig) -> tuple[list[float], list[float]]:
    mean = list(cfg.mean) * (cfg.channels if len(cfg.mean) == 1 else 1)
    std = list(cfg.std) * (cfg.channels if len(cfg.std) == 1 else 1)
    return mean, std


def _normalize(cfg: DataConfig) -> v2.Normalize:
    mean, std = _mean_std(cfg)
    return v2.Normalize(mean=mean, std=std)


def eval_resize(cfg: DataConfig) -> int:
    """The short side evaluation resizes to before its centre crop of image_size: floor(image_size / eval_crop_pct), as
    timm's crop_pct (torchvision's ImageNet evaluation: 224 / 0.875 = 256). Unset: size/0.875 (rounded) after training
    with RandomResizedCrop, else image_size itself (square, small images such as digits: a plain resize)."""
    size = cfg.image_size
    if cfg.eval_crop_pct is not None:
        return math.floor(size / cfg.eval_crop_pct)
    return int(round(size / 0.875)) if cfg.augment.random_resized_crop else size


def augment_steps(cfg: DataConfig, train: bool) -> list[v2.Transform]:
    """The per-image steps on uint8 CHW images, geometry first (it is what decoding at reduced size adapts)."""
    aug = cfg.augment
    size = cfg.image_size
    steps: list[v2.Transform] = []
    if train and aug.random_resized_crop:
        steps.append(v2.RandomResizedCrop(size, scale=(aug.crop_scale_min, 1.0), antialias=True))
    elif train:
        steps.append(v2.Resize((size, size), antialias=True))
    else:
        steps += [v2.Resize(eval_resize(cfg), antialias=True), v2.CenterCrop(size)]
    if train:
        if aug.crop_padding > 0:
            steps.append(v2.RandomCrop(size, padding=aug.crop_padding, padding_mode="reflect"))
        if aug.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(aug.hflip))
        if aug.rotation > 0 or aug.translate > 0:
            steps.append(v2.RandomAffine(degrees=aug.rotation, translate=(aug.translate, aug.translate)))
        if aug.color_jitter > 0:
            j = aug.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if cfg.channels == 3 else 0))
        if aug.auto_augment != "none":  # on the uint8 image after crop and flip, as torchvision's and timm's recipes
            steps.append(auto_augment_step(aug.auto_augment, aug.autoaugment_policy, aug.randaugment_num_ops,
                                           aug.randaugment_magnitude))
    return steps


def build_transform(cfg: DataConfig, train: bool) -> v2.Compose:
    """PIL image -> normalised float tensor. Evaluation transforms are deterministic."""
    return v2.Compose([v2.ToImage(), *augment_steps(cfg, train), v2.ToDtype(torch.float32, scale=True),
                       _normalize(cfg)])


class BatchNormalize:
    """uint8 images (one or a batch, any device) -> float32 normalised exactly as ToDtype + Normalize do it."""

    def __init__(self, cfg: DataConfig):
        self.mean, self.std = _mean_std(cfg)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        device = images.device
        if device not in self._constants:  # copied to the device once, not per batch
            self._constants[device] = (torch.tensor(self.mean, device=device).view(-1, 1, 1),
                                       torch.tensor(self.std, device=device).view(-1, 1, 1))
        mean, std = self._constants[device]
        floats = images.to(torch.float32) if out is None else out.copy_(images)
        # The same three elementwise operations as v2.ToDtype(scale=True) and v2.Normalize: same bits.
        return floats.mul_(1.0 / 255).sub_(mean).div_(std)


def _output_shape(step: v2.Transform, shape: tuple[int, int]) -> tuple[int, int]:
    """Height and width of an image of `shape` after `step`."""
    if isinstance(step, (v2.RandomResizedCrop, v2.CenterCrop, v2.RandomCrop)):
        return tuple(step.size)  # type: ignore[return-value]
    if isinstance(step, v2.Resize):
        if len(step.size) == 2:
            return tuple(step.size)  # type: ignore[return-value]
        height, width = shape
        short, target = min(shape), step.size[0]
        if height <= width:
            return target, int(target * width / short)
        return int(target * height / short), target
    return shape


class SampleAugment:
    """`augment_steps` with their random parameters drawn explicitly.

    `draw` takes the parameters from torch's global CPU generator in exactly the order the v2
    transforms would draw them when called one after another, so seeding that generator with the
    sample's seed reproduces `build_transform`'s randomness. The parameters can then be applied
    elsewhere (another process, another device), and the geometry of the first step can be scaled to
    an image decoded at reduced size.
    """

    def __init__(self, cfg: DataConfig, train: bool):
        self.steps = augment_steps(cfg, train)

    def draw(self, height: int, width: int) -> list[Optional[dict]]:
        """Parameters of every step (None: a random step that is skipped this time) for a height x width image."""
        params: list[Optional[dict]] = []
        shape = (height, width)
        for step in self.steps:
            # A stand-in with the image's size and no memory: parameters depend on the size only.
            stand_in = torch.empty((), dtype=torch.uint8).expand(1, *shape)
            if hasattr(step, "p") and torch.rand(1) >= step.p:  # as v2's random-apply transforms decide
                params.append(None)
            else:
                params.append(step.make_params([stand_in]))
            shape = _output_shape(step, shape)
        return params

    def apply(self, image: torch.Tensor, params: list[Optional[dict]]) -> torch.Tensor:
        """The steps on a uint8 CHW tensor (CPU or GPU) with the drawn parameters."""
        for step, values in zip(self.steps, params):
            if values is not None:
                image = step.transform(image, values)
        return image

    def max_reduction(self, params: list[Optional[dict]], height: int, width: int) -> float:
        """How many times smaller the image may be decoded while the first step still reads >= its output size."""
        step, values = self.steps[0], params[0]
        if isinstance(step, v2.RandomResizedCrop) and values is not None:
            out_h, out_w = step.size
            return min(values["height"] / out_h, values["width"] / out_w)
        out_h, out_w = _output_shape(step, (height, width))
        return min(height / out_h, width / out_w)

    def rescale(self, params: list[Optional[dict]], full: tuple[int, int], reduced: tuple[int, int]) -> list:
        """`params` for the same image decoded at `reduced` (height, width) instead of `full`."""
        if not isinstance(self.steps[0], v2.RandomResizedCrop) or params[0] is None:
            return params  # resizes take whatever size they get
        fy, fx = reduced[0] / full[0], reduced[1] / full[1]
        box = params[0]
        top, left = min(int(box["top"] * fy), reduced[0] - 1), min(int(box["left"] * fx), reduced[1] - 1)
        height = max(1, min(reduced[0] - top, math.floor(box["height"] * fy + 0.5)))
        width = max(1, min(reduced[1] - left, math.floor(box["width"] * fx + 0.5)))
        return [dict(top=top, left=left, height=height, width=width), *params[1:]]
