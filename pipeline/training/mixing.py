"""What happens to a training batch on its device between the loader and the loss: random erasing, then MixUp or
CutMix with soft targets.

Both work on the normalised float batch (as torchvision's RandomErasing and timm's loader erase, and as MixUp and
CutMix mix), on whatever device it is on; only the random choices are made on the CPU, with torch's global CPU
generator seeded for the batch by (train.seed, epoch, layout generation, rank-local step, rank) and restored
afterwards. So a resumed run draws the very same erasures and mixes, whichever path decoded the images, and the
run's other randomness (dropout) is untouched. Evaluation never passes through here.

The draws are torchvision's own: per image `v2.RandomErasing` (`torch.rand(1) < p`, then its `make_params`);
per batch timm's choice (`rand < mix_prob` mixes; with both alphas on, `rand < mix_switch_prob` picks CutMix),
then lambda and the box exactly as `v2.MixUp` / `v2.CutMix` draw them. Images pair with their neighbour
(`roll(1, 0)`), as torchvision pairs them; the loader has already shuffled the batch.

Targets: with mixing on, every batch (mixed or not) gets probability targets `lam * one_hot(y) + (1 - lam) *
one_hot(y rolled)` (task.type=multilabel: the multi-hot targets mixed the same way), so the loss is always the same
function (`pipeline.training.losses`: label smoothing, class weights and BCE apply to them). The training accuracy
reported for such a batch is the target's weight on the predicted class (`lam` if the model picks the first label,
`1 - lam` if the second, 0 otherwise): on an unmixed
batch the usual accuracy, on mixed batches what the soft target credits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms import v2

from pipeline.config.schema import AugmentConfig
from pipeline.data.samples.transforms import seeded_cpu_rng


class HardTargets:
    """The labels as they are: what the loss and the accuracy see when no batch is mixed."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def targets(self, num_classes: int) -> torch.Tensor:
        return self.labels

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.detach().argmax(dim=-1) == self.labels).sum().float()


class MixedTargets:
    """Probability targets `lam * one_hot(labels) + (1 - lam) * one_hot(labels.roll(1, 0))`, as torchvision's
    MixUp/CutMix build them (lam = 1: the one-hot labels)."""

    def __init__(self, labels: torch.Tensor, lam: float):
        self.labels, self.lam = labels, lam
        self._targets: Optional[torch.Tensor] = None

    def targets(self, num_classes: int) -> torch.Tensor:
        if self._targets is None:
            if self.labels.is_floating_point():  # multi-hot already (task.type=multilabel): mixed as they are
                one_hot = self.labels.clone()
            else:
                # scatter_ rather than F.one_hot, which checks the labels' range on the host (a sync per step on a
                # GPU).
                one_hot = torch.zeros(len(self.labels), num_classes, device=self.labels.device)
                one_hot.scatter_(1, self.labels.unsqueeze(1), 1.0)
            self._targets = one_hot if self.lam == 1.0 else \
                one_hot.roll(1, 0).mul_(1.0 - self.lam).add_(one_hot.mul(self.lam))
        return self._targets

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        return self.targets(logits.shape[-1]).gather(1, logits.detach().argmax(dim=-1, keepdim=True)).sum()


class BatchAugment:
    """Random erasing and MixUp/CutMix of training batches (`data.augment`); a no-op when all are off."""

    def __init__(self, cfg: AugmentConfig, seed: int):
        self.seed = seed
        self.erasing = v2.RandomErasing(p=cfg.random_erasing, value=0) if cfg.random_erasing > 0 else None
        self.mixup = v2.MixUp(alpha=cfg.mixup_alpha) if cfg.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else None
        self.mix_prob, self.switch_prob = cfg.mix_prob, cfg.mix_switch_prob

    @property
    def enabled(self) -> bool:
        return self.erasing is not None or self.mixes

    @property
    def mixes(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def batch_seed(self, position: tuple[int, ...]) -> int:
        """The seed of the batch at `position` (epoch, layout generation, rank-local step, rank)."""
        return hash((self.seed, *position, 0x313C)) & 0x7FFF_FFFF_FFFF_FFFF

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 position: tuple[int, ...]) -> tuple[torch.Tensor, HardTargets | MixedTargets]:
        """(images, targets) for the batch at `position`; images may be changed in place."""
        if not self.enabled:
            return images, HardTargets(labels)
        with seeded_cpu_rng(self.batch_seed(position)):
            boxes = self.draw_erasing(images.shape) if self.erasing is not None else []
            mix = self.draw_mix(images.shape) if self.mixes else None
        for index, box in boxes:
            erase(images[index], box)
        if mix is None:
            return images, HardTargets(labels)
        kind, params = mix
        if kind == "mixup":
            images = mixup_images(images, params["lam"])
        elif kind == "cutmix":
            images = cutmix_images(images, params["box"])
        return images, MixedTargets(labels, params["lam"])

    def draw_erasing(self, shape: torch.Size) -> list[tuple[int, dict]]:
        """(index, RandomErasing parameters) of each image erased, drawn as v2.RandomErasing called on each image in
        turn draws them."""
        assert self.erasing is not None
        stand_in = torch.empty((), dtype=torch.float32).expand(*shape[1:])  # parameters depend on the size only
        boxes = []
        for index in range(shape[0]):
            if torch.rand(1) >= self.erasing.p:
                continue
            params = self.erasing.make_params([stand_in])
            if params["v"] is not None:  # None: no box fitted in 10 tries, nothing erased
                boxes.append((index, params))
        return boxes

    def draw_mix(self, shape: torch.Size) -> tuple[str, dict]:
        """("none" | "mixup" | "cutmix", parameters with the targets' lam): timm's choice, torchvision's draws."""
        if not torch.rand(1) < self.mix_prob:
            return "none", {"lam": 1.0}
        if self.mixup is not None and self.cutmix is not None:
            use_cutmix = bool(torch.rand(1) < self.switch_prob)
        else:
            use_cutmix = self.cutmix is not None
        if not use_cutmix:
            assert self.mixup is not None
            return "mixup", self.mixup.make_params([])
        assert self.cutmix is not None
        params = self.cutmix.make_params([torch.empty((), dtype=torch.float32).expand(*shape)])
        return "cutmix", {"box": params["box"], "lam": params["lam_adjusted"]}


def erase(image: torch.Tensor, params: dict) -> None:
    """`F.erase` with value 0, in place: the same bits as v2.RandomErasing(value=0) with these parameters."""
    image[..., params["i"]:params["i"] + params["h"], params["j"]:params["j"] + params["w"]] = 0.0


def mixup_images(images: torch.Tensor, lam: float) -> torch.Tensor:
    """v2.MixUp's image mix (same operations, same bits): lam * x + (1 - lam) * x rolled by one."""
    return images.roll(1, 0).mul_(1.0 - lam).add_(images.mul(lam))


def cutmix_images(images: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """v2.CutMix's paste, in place: the box (x1, y1, x2, y2) of each image taken from its neighbour (rolled by one)."""
    x1, y1, x2, y2 = box
    images[..., y1:y2, x1:x2] = images[..., y1:y2, x1:x2].roll(1, 0)
    return images
