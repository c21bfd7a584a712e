"""`pipeline visualize`'s capture hooks: feature maps and Grad-CAM are not changed by in-place ReLUs, and the hooks
are removed."""

from __future__ import annotations

import torch

from pipeline.models import SimpleCNN


def test_capture_is_not_changed_by_inplace_relu_and_hooks_are_removed():
    from pipeline.commands.visualize.hooks import feature_maps, grad_cam

    torch.manual_seed(0)
    model = SimpleCNN(3, 1, (4, 8))
    images = torch.randn(2, 1, 8, 8)
    maps = feature_maps(model, images, ["features.0.0.1", "features.0.0.2"])  # BN output, then in-place ReLU
    assert maps["features.0.0.1"].shape == (2, 4, 8, 8)
    assert (maps["features.0.0.1"] < 0).any() and not (maps["features.0.0.2"] < 0).any()
    model.train()
    cams, logits = grad_cam(model, "features.1.0.0", images)
    assert cams.shape == (2, 8, 8) and float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0 + 1e-6
    assert logits.shape == (2, 3)
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # every hook removed
    assert all(p.grad is None for p in model.parameters())
