"""torchvision transforms.v2 pipelines built from the data config."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from pipeline.config.schema import DataConfig


def _normalize(cfg: DataConfig) -> v2.Normalize:
    mean = list(cfg.mean) * (cfg.channels if len(cfg.mean) == 1 else 1)
    std = list(cfg.std) * (cfg.channels if len(cfg.std) == 1 else 1)
    return v2.Normalize(mean=mean, std=std)


def build_transform(cfg: DataConfig, train: bool) -> v2.Compose:
    """PIL image -> normalised float tensor. Evaluation transforms are deterministic."""
    aug = cfg.augment
    size = cfg.image_size
    steps: list = [v2.ToImage()]
    if train and aug.random_resized_crop:
        steps.append(v2.RandomResizedCrop(size, scale=(aug.crop_scale_min, 1.0), antialias=True))
    elif train:
        steps.append(v2.Resize((size, size), antialias=True))
    else:
        # Resize the short side to size/0.875 then centre-crop, as ImageNet evaluation does; for images
        # already square and small (digits), this is a plain resize.
        steps += [v2.Resize(size if not aug.random_resized_crop else int(round(size / 0.875)), antialias=True),
                  v2.CenterCrop(size)]
    if train:
        if aug.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(aug.hflip))
        if aug.rotation > 0 or aug.translate > 0:
            steps.append(v2.RandomAffine(degrees=aug.rotation, translate=(aug.translate, aug.translate)))
        if aug.color_jitter > 0:
            j = aug.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if cfg.channels == 3 else 0))
    steps += [v2.ToDtype(torch.float32, scale=True), _normalize(cfg)]
    return v2.Compose(steps)
