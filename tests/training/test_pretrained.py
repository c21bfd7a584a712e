"""Pretrained weights: torchvision names from the local cache (offline), files, run folders, the load report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from pipeline.config.schema import ModelConfig
from pipeline.models import create_model
from pipeline.models.pretrained import (
    cached_weights_path,
    head_module_name,
    load_pretrained,
    read_pretrained_state,
    torchvision_weights,
)

ROOT = Path(__file__).resolve().parents[2]
NAME = "ResNet18_Weights.IMAGENET1K_V1"


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache for this test only."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_torchvision_name_loads_from_local_cache_with_new_head(hub_dir):
    torch.manual_seed(0)
    saved = models.resnet18(weights=None).state_dict()  # stands in for the ImageNet file: same keys and shapes
    path = cached_weights_path(torchvision_weights(NAME))
    assert path == hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(saved, path)

    model = create_model(ModelConfig(name="resnet18"), num_classes=7)
    report = load_pretrained(model, read_pretrained_state(NAME, "resnet18"), NAME)

    assert report.head == ["fc.weight", "fc.bias"]
    assert len(report.loaded) == len(saved) - 2
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in report.loaded)
    assert state["fc.weight"].shape == (7, 512)


def test_missing_weights_file_is_one_clear_line(hub_dir):
    with pytest.raises(FileNotFoundError) as info:
        read_pretrained_state(NAME, "resnet18")
    message = str(info.value)
    assert "\n" not in message
    assert str(hub_dir / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def test_cli_missing_weights_exits_2_with_one_line(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "configs/finetune_resnet18.yaml", f"data.root={tmp_path}/digits",
         "data.auto_prepare_digits=true", "logging.wandb_mode=disabled", "train.cpu=true",
         "train.precision=fp32", f"run.output_dir={tmp_path}/runs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: weights ResNet18_Weights.IMAGENET1K_V1 are not in the "
                                                   "local torch cache")
    assert f"{tmp_path}/torch/hub/checkpoints/resnet18-f37072fd.pth" in lines[0]
    assert not (tmp_path / "runs").exists()  # a preflight check: before the run folder and the loaders exist


def test_weights_of_another_architecture_are_refused(hub_dir):
    with pytest.raises(ValueError, match="another architecture than model.name='resnet34'"):
        read_pretrained_state(NAME, "resnet34")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", "run_folder"])
def test_state_dict_files_and_run_folders(tmp_path, suffix):
    torch.manual_seed(1)
    source = create_model(ModelConfig(channels=[8, 16]), num_classes=5, in_channels=1)
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, path)  # DDP-style prefix, wrapped
    elif suffix == ".safetensors":
        path = tmp_path / "w.safetensors"
        save_file(saved, str(path))
    else:
        path = tmp_path / "run"
        (path / "checkpoints" / "best").mkdir(parents=True)
        save_file(saved, str(path / "checkpoints" / "best" / "model.safetensors"))

    torch.manual_seed(2)
    model = create_model(ModelConfig(channels=[8, 16]), num_classes=3, in_channels=1)
    fresh_head = model.state_dict()["head.2.weight"].clone()
    report = load_pretrained(model, read_pretrained_state(str(path)), str(path))

    assert head_module_name(model) == "head.2"
    assert report.head == ["head.2.weight", "head.2.bias"]
    assert len(report.loaded) == len(saved) - 2
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in report.loaded)
    assert torch.equal(model.state_dict()["head.2.weight"], fresh_head)  # the head stays new


def test_report_lists_shape_mismatches_and_adapts_rgb_first_conv():
    torch.manual_seed(0)
    rgb = models.resnet18(weights=None).state_dict()
    rgb["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)  # a deliberately wrong shape
    rgb["extra.weight"] = torch.zeros(1)
    model = create_model(ModelConfig(name="resnet18"), num_classes=4, in_channels=1)
    report = load_pretrained(model, rgb, "x", load_head=True)

    assert report.mismatched == ["layer1.0.conv1.weight: (64, 64, 1, 1) -> (64, 64, 3, 3)",
                                 "fc.weight: (1000, 512) -> (4, 512)", "fc.bias: (1000,) -> (4,)"]
    assert report.unexpected == ["extra.weight"]
    assert report.adapted == ["conv1.weight: RGB filters summed for 1-channel input"]
    assert torch.equal(model.state_dict()["conv1.weight"], rgb["conv1.weight"].sum(dim=1, keepdim=True))


def test_missing_path_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pretrained_state(str(tmp_path / "nope.pth"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="suffix '.txt'"):
        read_pretrained_state(str(tmp_path / "w.txt"))


def test_small_input_stem_keeps_32px_detail_and_still_loads_pretrained_weights() -> None:
    from pipeline.config import load_config
    from pipeline.models import create_model
    from pipeline.models.pretrained import load_pretrained

    stem = create_model(load_config(None, ["model.name=resnet18", "model.small_input_stem=true"]).model, 10)
    assert (stem.conv1.kernel_size, stem.conv1.stride, stem.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    x = torch.randn(2, 3, 32, 32)
    assert stem.maxpool(stem.conv1(x)).shape == (2, 64, 32, 32)  # the ImageNet stem gives 8x8 here
    imagenet = create_model(load_config(None, ["model.name=resnet18"]).model, 10)
    assert imagenet.maxpool(imagenet.conv1(x)).shape == (2, 64, 8, 8)
    lines = load_pretrained(stem, imagenet.state_dict(), "ref").lines()
    assert "shape mismatch (kept initialised): 1: conv1.weight: (64, 3, 7, 7) -> (64, 3, 3, 3)" in lines[-1]
    assert torch.equal(stem.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)
    for name in ("simple_cnn", "mobilenet_v2"):
        with pytest.raises(ValueError, match="small_input_stem"):
            create_model(load_config(None, [f"model.name={name}", "model.small_input_stem=true"]).model, 10)
