"""Pretrained weights: find them (torchvision name, state-dict file, run folder), load what fits, say what did not.

Nothing is downloaded: a torchvision weights name is read from the torch hub cache, where
`torchvision` itself would have stored it, and a missing file is one line saying where to put it.
Loading is partial by design: keys whose shape differs (a new head, a different first convolution)
are skipped and listed, and the classifier head is left freshly initialised unless asked otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.errors import first_line


@dataclass
class LoadReport:
    """What a partial load did; `lines()` is what gets printed."""

    source: str
    loaded: list[str] = field(default_factory=list)
    """Keys copied from the file."""
    missing: list[str] = field(default_factory=list)
    """Model keys the file does not have (left as initialised)."""
    unexpected: list[str] = field(default_factory=list)
    """File keys the model does not have (ignored)."""
    mismatched: list[str] = field(default_factory=list)
    """Keys present in both with different shapes: 'key: file shape -> model shape' (left as initialised)."""
    head: list[str] = field(default_factory=list)
    """Head keys deliberately not loaded (the head is new for the new classes)."""
    adapted: list[str] = field(default_factory=list)
    """Keys converted to fit, e.g. RGB first-conv filters summed for a grayscale input."""

    def lines(self) -> list[str]:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "")

        out = [f"pretrained weights from {self.source}: loaded {len(self.loaded)} tensors"]
        for label, keys in (("new head (not loaded)", self.head), ("adapted", self.adapted),
                            ("shape mismatch (kept initialised)", self.mismatched),
                            ("missing in file (kept initialised)", self.missing),
                            ("unexpected in file (ignored)", self.unexpected)):
            if keys:
                out.append(f"  {label}: {len(keys)}: {few(keys)}")
        return out


def is_torchvision_weights_name(source: str) -> bool:
    """`ResNet18_Weights.IMAGENET1K_V1`-style names (and not an existing path)."""
    return "_Weights." in source and not Path(source).exists()


def torchvision_weights(source: str):
    """The torchvision weights enum member named `source`; one clear line if it does not exist."""
    from torchvision import models

    try:
        return models.get_weight(source)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"finetune.weights={source!r} is not a torchvision weights name "
                         "(e.g. ResNet18_Weights.IMAGENET1K_V1)") from None


def cached_weights_path(weights) -> Path:
    """Where torchvision keeps this weights file: <torch hub dir>/checkpoints/<file name of its URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _unwrap(state: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{source}' does not hold a state dict of tensors")
    # Weights saved from a DDP- or compile-wrapped model carry a prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from pipeline.checkpointing.safe_load import load_tensors

    try:
        return _unwrap(load_tensors(path), str(path))
    except OSError as exc:
        raise ValueError(f"cannot read '{path}' as a state dict: {first_line(exc)}") from None


def _weights_file_of_folder(folder: Path) -> Path:
    """A run folder (its best, else last checkpoint) or a checkpoint folder -> its model.safetensors."""
    for candidate in (folder / "model.safetensors", folder / "checkpoints" / "best" / "model.safetensors",
                      folder / "checkpoints" / "last" / "model.safetensors"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"finetune.weights='{folder}' is a folder without model.safetensors or "
                            "checkpoints/{best,last}/model.safetensors")


def pretrained_weights_file(source: str, model_name: str | None = None) -> Path:
    """The file `source` names (see the module docstring), checked to exist and to fit `model_name`, not read: cheap
    enough for the preflight checks. Never downloads."""
    if is_torchvision_weights_name(source):
        weights = torchvision_weights(source)
        if model_name is not None:
            from torchvision import models

            try:
                expected = models.get_model_weights(model_name)
            except (ValueError, KeyError):
                expected = None
            if expected is not None and type(weights) is not expected:
                raise ValueError(f"finetune.weights={source!r} belongs to another architecture than "
                                 f"model.name={model_name!r} (use {expected.__name__}.<name>)")
        path = cached_weights_path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights {source} are not in the local torch cache (no download here): "
                                    f"fetch {weights.url} and put it at {path}")
        return path
    path = Path(source)
    if path.is_dir():
        return _weights_file_of_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"finetune.weights='{source}' does not exist; give a torchvision weights name, "
                                "a .pth/.pt/.safetensors file, or a run folder")
    if path.suffix not in (".pth", ".pt", ".safetensors", ".bin"):
        raise ValueError(f"finetune.weights='{source}' has suffix '{path.suffix}'; use .pth, .pt or .safetensors")
    return path


def read_pretrained_state(source: str, model_name: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict named by `source` (see the module docstring); never downloads."""
    return _load_file(pretrained_weights_file(source, model_name))


def head_module_name(model: nn.Module) -> str:
    """The classifier head: the last nn.Linear in registration order (fc, classifier.1, head.2 ...)."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ValueError(f"cannot find a classifier head (no nn.Linear) in {type(model).__name__}")
    return name


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str = "",
                    load_head: bool = False) -> LoadReport:
    """Copy the tensors of `state` that fit into `model`; return the report of everything else."""
    report = LoadReport(source=source)
    head = head_module_name(model)
    target = model.state_dict()
    update = {}
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif _under(key, head) and not load_head:
            continue
        elif value.shape != target[key].shape:
            wanted = target[key].shape
            # An RGB-trained first conv used on grayscale: the sum of the colour filters sees gray
            # input exactly as the RGB filters saw a gray image (R = G = B).
            if value.ndim == 4 and len(wanted) == 4 and wanted[1] == 1 and value.shape[1] == 3 \
                    and value.shape[0] == wanted[0] and value.shape[2:] == wanted[2:]:
                update[key] = value.sum(dim=1, keepdim=True)
                report.adapted.append(f"{key}: RGB filters summed for 1-channel input")
            else:
                report.mismatched.append(f"{key}: {tuple(value.shape)} -> {tuple(wanted)}")
        else:
            update[key] = value
    report.loaded = [k for k in target if k in update]  # model order
    report.head = [k for k in target if _under(k, head) and not load_head]
    report.missing = [k for k in target if k not in state and k not in report.head]
    with torch.no_grad():
        for key, value in update.items():
            target[key].copy_(value.to(dtype=target[key].dtype))
    return report


def pretrained_input(source: str) -> dict:
    """image_size / mean / std of a torchvision weights name's own preprocessing."""
    transform = torchvision_weights(source).transforms()
    return {"image_size": int(transform.crop_size[0]), "resize_size": int(transform.resize_size[0]),
            "mean": list(transform.mean), "std": list(transform.std)}
