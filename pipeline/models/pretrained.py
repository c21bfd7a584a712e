"""Pretrained weights: find them (torchvision name, Hugging Face cache, state-dict file, run folder), load what fits,
say what did not.

Nothing is downloaded: a torchvision weights name is read from the torch hub cache, where
`torchvision` itself would have stored it, an `hf-hub:org/name` from the Hugging Face cache, where
`huggingface_hub` (timm's downloader) would have stored it, and a missing file is one line saying where it was
looked for.
Loading is partial by design: keys whose shape differs (a new head, a different first convolution)
are skipped and listed, and the classifier head is left freshly initialised unless asked otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.errors import first_line
from pipeline.run_folder import CHECKPOINTS_DIR, RunFolder


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


HF_PREFIX = "hf-hub:"
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weights files of a Hugging Face model repository (timm's), in the order they are preferred."""


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser() / "hub"


def hf_snapshot(repo_folder: Path) -> Path:
    """The snapshot of a `models--org--name` cache folder that refs/main names (else its only snapshot)."""
    ref = repo_folder / "refs" / "main"
    if ref.is_file():
        return repo_folder / "snapshots" / ref.read_text().strip()
    snapshots = sorted((repo_folder / "snapshots").glob("*")) if (repo_folder / "snapshots").is_dir() else []
    return snapshots[0] if len(snapshots) == 1 else repo_folder / "snapshots" / "<refs/main>"


def hf_weights_file(source: str) -> Path:
    """`hf-hub:org/name` -> the weights file of its snapshot in the local Hugging Face cache; never downloads."""
    repo_id = source[len(HF_PREFIX):]
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"finetune.weights={source!r} is not hf-hub:<org>/<name> (e.g. hf-hub:timm/resnet18.a1_in1k)")
    snapshot = hf_snapshot(hf_cache_dir() / f"models--{repo_id.replace('/', '--')}")
    for name in HF_WEIGHTS_FILES:
        if (snapshot / name).is_file():
            return snapshot / name
    raise FileNotFoundError(f"finetune.weights={source!r} is not in the local Hugging Face cache (no download here): "
                            f"looked for {snapshot / HF_WEIGHTS_FILES[0]} (or {HF_WEIGHTS_FILES[1]}); set "
                            "HF_HUB_CACHE or HF_HOME to the cache that holds it, or give the file's path")


def _weights_file_of_folder(folder: Path) -> Path:
    """A run folder (its best, else last checkpoint), a checkpoint folder, or a Hugging Face cache folder
    (models--org--name, or one of its snapshots) -> its weights file."""
    if folder.name.startswith("models--"):
        folder = hf_snapshot(folder)
    run = RunFolder(folder)
    for candidate in (folder / "model.safetensors", run.checkpoint("best") / "model.safetensors",
                      run.checkpoint("last") / "model.safetensors", folder / "pytorch_model.bin"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"finetune.weights='{folder}' is a folder without model.safetensors, "
                            "checkpoints/{best,last}/model.safetensors or pytorch_model.bin")


def is_run_folder(source: str) -> bool:
    """A run or checkpoint folder of ours (its data settings are its own config's, not a pretrained config's)."""
    path = Path(source)
    return path.is_dir() and (RunFolder(path).is_run() or path.parent.name == CHECKPOINTS_DIR)


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
    if source.startswith(HF_PREFIX):
        return hf_weights_file(source)
    path = Path(source)
    if path.is_dir():
        return _weights_file_of_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"finetune.weights='{source}' does not exist; give a torchvision weights name, "
                                "hf-hub:<org>/<name>, a .pth/.pt/.safetensors file, or a run folder")
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


def hub_pretrained_cfg(source: str) -> dict | None:
    """The `pretrained_cfg` of the config.json beside hub weights (hf-hub:..., a cache folder, a file in one), if
    any: the preprocessing those very weights were trained with."""
    try:
        weights = pretrained_weights_file(source)
        config = json.loads((weights.parent / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = config.get("pretrained_cfg") if isinstance(config, dict) else None
    return cfg if isinstance(cfg, dict) and {"input_size", "mean", "std"} <= set(cfg) else None
