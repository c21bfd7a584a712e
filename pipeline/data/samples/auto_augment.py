"""Automatic augmentation (RandAugment, TrivialAugment, AutoAugment, AugMix) with its random choices drawn apart.

torchvision.transforms.v2's auto-augment transforms make their random choices inside `forward`, so the loader
could not draw a sample's choices in one place (a worker, from the sample's seed) and apply them in another (the
main process, `data.decode_device=cpu|cuda`), as it does for every other step (`transforms.SampleAugment`).
`AutoAugmentStep` wraps one of them as a v2 transform with the usual `make_params` / `transform` split:

- `make_params` draws from torch's global CPU generator in exactly the order the wrapped transform's `forward`
  draws, so under the same seed both choose the same ops and magnitudes;
- `transform` applies the chosen ops with the wrapped transform's own op code
  (`_apply_image_or_video_transform`, a private torchvision method: the one place we call it), so the pixels are
  torchvision's.

tests/test_augment.py checks both against torchvision bit for bit (the whole transform under one seed, and each
op against `torchvision.transforms.v2.functional`), so a torchvision release that changes either is caught.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.config.schema import AUTO_AUGMENTS

INTERPOLATION = v2.InterpolationMode.BILINEAR
"""As torchvision's classification reference recipe (presets.py) runs them; torchvision's own default is nearest."""


def _signed(magnitude: float, signed: bool) -> float:
    """The magnitude, negated with probability 1/2 for signed ops (one draw, as torchvision draws it)."""
    return -magnitude if signed and torch.rand(()) <= 0.5 else magnitude


class AutoAugmentStep(v2.Transform):
    """One of torchvision's auto-augment transforms (`reference`) with explicit parameters.

    Parameters: `{"ops": [(op name, magnitude), ...]}` applied in order, or for AugMix
    `{"original": weight, "weights": per-chain weights, "chains": [[(op, magnitude), ...], ...]}`.
    """

    def __init__(self, reference: v2.Transform):
        super().__init__()
        self.reference = reference

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        ref = self.reference
        if isinstance(ref, v2.AugMix):
            return self._augmix_params(height, width)
        if isinstance(ref, v2.RandAugment):
            ops = []
            for _ in range(ref.num_ops):
                name, (magnitudes, signed) = ref._get_random_item(ref._AUGMENTATION_SPACE)
                values = magnitudes(ref.num_magnitude_bins, height, width)
                ops.append((name, 0.0 if values is None else _signed(float(values[ref.magnitude]), signed)))
            return {"ops": ops}
        if isinstance(ref, v2.TrivialAugmentWide):
            name, (magnitudes, signed) = ref._get_random_item(ref._AUGMENTATION_SPACE)
            values = magnitudes(ref.num_magnitude_bins, height, width)
            bins = ref.num_magnitude_bins
            return {"ops": [(name, 0.0 if values is None else
                             _signed(float(values[int(torch.randint(bins, ()))]), signed))]}
        if isinstance(ref, v2.AutoAugment):
            ops = []
            for name, probability, index in ref._policies[int(torch.randint(len(ref._policies), ()))]:
                if not torch.rand(()) <= probability:
                    continue
                magnitudes, signed = ref._AUGMENTATION_SPACE[name]
                values = magnitudes(10, height, width)
                ops.append((name, 0.0 if values is None else _signed(float(values[index]), signed)))
            return {"ops": ops}
        raise TypeError(f"no explicit parameters for {type(ref).__name__}")

    def _augmix_params(self, height: int, width: int) -> dict[str, Any]:
        ref = self.reference
        space = ref._AUGMENTATION_SPACE if ref.all_ops else ref._PARTIAL_AUGMENTATION_SPACE
        mix = ref._sample_dirichlet(torch.tensor([ref.alpha, ref.alpha]).expand(1, -1))
        weights = ref._sample_dirichlet(torch.tensor([ref.alpha] * ref.mixture_width).expand(1, -1)) * mix[:, 1:]
        chains = []
        for _ in range(ref.mixture_width):
            depth = ref.chain_depth if ref.chain_depth > 0 else int(torch.randint(low=1, high=4, size=(1,)).item())
            chain = []
            for _ in range(depth):
                name, (magnitudes, signed) = ref._get_random_item(space)
                values = magnitudes(ref._PARAMETER_MAX, height, width)
                chain.append((name, 0.0 if values is None else
                              _signed(float(values[int(torch.randint(ref.severity, ()))]), signed)))
            chains.append(chain)
        return {"original": mix[:, 0], "weights": weights, "chains": chains}

    def _op(self, image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
        ref = self.reference
        return ref._apply_image_or_video_transform(image, name, magnitude, interpolation=ref.interpolation,
                                                   fill=ref._fill)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if "ops" in params:
            for name, magnitude in params["ops"]:
                inpt = self._op(inpt, name, magnitude)
            return inpt
        # AugMix, as torchvision's forward computes it: float mixture of the chains, truncated back to the dtype.
        dims = list(inpt.shape)
        batch = inpt.reshape([1] * max(4 - inpt.ndim, 0) + dims)
        shape = [batch.size(0)] + [1] * (batch.ndim - 1)
        mix = params["original"].to(batch.device).reshape(shape) * batch
        for index, chain in enumerate(params["chains"]):
            augmented = batch
            for name, magnitude in chain:
                augmented = self._op(augmented, name, magnitude)
            mix.add_(params["weights"][:, index].to(batch.device).reshape(shape) * augmented)
        mix = mix.reshape(dims).to(dtype=inpt.dtype)
        return tv_tensors.wrap(mix, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else mix


def auto_augment_step(name: str, policy: str = "imagenet", num_ops: int = 2, magnitude: int = 9) -> AutoAugmentStep:
    """The step for `data.augment.auto_augment=name` (one of AUTO_AUGMENTS but none), torchvision's defaults
    otherwise (31 magnitude bins; AugMix severity 3, width 3, random depth 1-3, alpha 1)."""
    if name == "randaugment":
        reference: v2.Transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=INTERPOLATION)
    elif name == "trivialaugment":
        reference = v2.TrivialAugmentWide(interpolation=INTERPOLATION)
    elif name == "autoaugment":
        reference = v2.AutoAugment(v2.AutoAugmentPolicy(policy), interpolation=INTERPOLATION)
    elif name == "augmix":
        reference = v2.AugMix(interpolation=INTERPOLATION)
    else:
        raise ValueError(f"data.augment.auto_augment={name!r} is not valid; choose one of {', '.join(AUTO_AUGMENTS)}")
    return AutoAugmentStep(reference)
