"""`pipeline export RUN_DIR --format torchscript|onnx|exported`: a run's best weights as a deployable model.

The model is exported in eval mode on the CPU with a dynamic batch size, next to it go a sidecar JSON (classes,
normalisation, image size, channels, the task and its state (task.type; multilabel thresholds, regression target
mean/std) and what the outputs mean, config hash, git commit, the parity figures) and a safetensors file of the
weights carrying the same metadata. Before anything is written where asked, the exported model is loaded back and
run on real validation images at two batch sizes; its logits must match the PyTorch model's (max abs diff printed),
else nothing is written. ONNX needs the optional extra: pip install -e ".[export]" (onnx, onnxruntime).

Where: `--out` names a file with the format's suffix, or a folder (existing, or given with a trailing '/') that
gets `model.<suffix>`, `model.json` and `model.safetensors`; an export never writes into a checkpoint folder or a
run's `checkpoints/` (its `model.safetensors` would replace the weights there).

Loading: TorchScript and torch.export programs hold code that runs when they are loaded, so `pipeline predict`
loads them only with --trust-code (`CODE_FORMATS`); ONNX and the safetensors weights (rebuilt into the recorded
architecture) hold none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.run_folder import CHECKPOINTS_DIR, RunFolder

FORMATS = {"torchscript": ".pt", "exported": ".pt2", "onnx": ".onnx"}
"""Export formats and the file suffix each is written with."""
TOLERANCE = 1e-4
"""Largest absolute difference of logits (exported model vs PyTorch, fp32 on the CPU) accepted by default."""
PARITY_IMAGES = 32
"""Validation images the parity check runs (as one batch, then the first one alone: the batch size is dynamic)."""
SIDECAR_SUFFIX = ".json"
CODE_FORMATS = ("torchscript", "exported")
"""Formats whose files hold code that runs when they are loaded (TorchScript, a torch.export program's pickles)."""


@dataclass
class Exported:
    """What `export_run` wrote and how closely it matches."""

    path: Path
    sidecar: Path
    weights: Path
    max_abs_diff: float
    metadata: dict


def _needs(module: str, fmt: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ValueError(f"--format {fmt} needs the {module} package: pip install -e \".[export]\"") from None


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """PyTorch >= 2.10 marks torch.jit deprecated with a FutureWarning per call; asked for by name, it is not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        yield


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad(), _quiet_torchscript():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _write_exported(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    _needs("onnx", "onnx")
    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    "torchscript": _write_torchscript, "exported": _write_exported, "onnx": _write_onnx}


def load_exported(path: str | Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported model as a function of a float32 NCHW batch (CPU) returning logits."""
    path = Path(path)
    if fmt == "torchscript":
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location="cpu")
        module.eval()
        return module
    if fmt == "exported":
        return torch.export.load(str(path)).module()
    if fmt == "onnx":
        _needs("onnxruntime", "onnx")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _git_commit(run_dir: Path) -> str | None:
    """The commit that trained the run (its run_info.json), else None."""
    try:
        return json.loads(RunFolder(run_dir).run_info.read_text()).get("git_commit")
    except (OSError, ValueError):
        return None


def export_metadata(run, fmt: str) -> dict:
    """The sidecar's content for a loaded run (before the parity figures are added)."""
    data = run.cfg.data
    config_text = run.folder.config.read_text()
    return {"format": fmt, "model": run.cfg.model.name, "model_config": dataclasses.asdict(run.cfg.model),
            "classes": run.classes, "num_classes": len(run.classes),
            "channels": data.channels, "image_size": data.image_size, "mean": list(data.mean), "std": list(data.std),
            "random_resized_crop": data.augment.random_resized_crop, "eval_crop_pct": data.eval_crop_pct,
            "weights": run.weights, "tta": run.cfg.eval.tta, "task": run.task.state(), "output": run.task.output_rule,
            "input": "float32 NCHW batch, RGB/L scaled to [0, 1] then (x - mean) / std; any batch size",
            "tta_rule": "the model is exported without test-time augmentation; tta flip: average the logits of the "
                        "batch and its mirror (flip of the last axis); flip_shift: 1/4 each of those, 1/8 each of the "
                        "two for the batch shifted one pixel up-left and down-right (reflection pad 1, crop)",
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(), "git_commit": _git_commit(run.run_dir),
            "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint), "torch": torch.__version__}


def parity_images(run, count: int = PARITY_IMAGES) -> torch.Tensor:
    """The first `count` images of the validation split, as the model sees them (eval transform, normalised)."""
    images = []
    for batch, _ in run.loader("val"):
        images.append(batch)
        if sum(len(b) for b in images) >= count:
            break
    if not images:
        raise ValueError(f"'{run.run_dir}': the validation split is empty; the export cannot be checked")
    return torch.cat(images)[:count].float().contiguous()


def max_abs_diff(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """Largest |logit difference| over the batch and over its first image alone (the batch size is dynamic)."""
    worst = 0.0
    with torch.no_grad():
        for batch in (images, images[:1]):
            expected, got = model(batch), exported(batch)
            if tuple(got.shape) != tuple(expected.shape):
                raise ValueError(f"the exported model returned shape {tuple(got.shape)} for a batch of "
                                 f"{len(batch)}; expected {tuple(expected.shape)}")
            worst = max(worst, float((got.float() - expected.float()).abs().max()))
    return worst


def checkpoint_folder_of(path: Path) -> Path | None:
    """The checkpoint folder (one with a COMPLETE marker) or run `checkpoints/` folder `path` would be written in,
    following links; None when it lies outside every one."""
    from pipeline.checkpointing.checkpointer import MARKER

    for folder in Path(os.path.realpath(path)).parents:
        if (folder / MARKER).is_file() or folder.name == CHECKPOINTS_DIR and RunFolder(folder.parent).config.is_file():
            return folder
    return None


def output_path(run_dir: Path, fmt: str, out: str | Path | None) -> Path:
    """The exported model's path: default RUN_DIR/export/FORMAT/model.SUFFIX; a folder `out` (existing, or ending
    in '/') gets model.SUFFIX inside; a file `out` must end with the format's suffix (its .json and .safetensors go
    beside it). ValueError, before anything is read, for a path inside a checkpoint."""
    suffix = FORMATS[fmt]
    if out is None:
        path = RunFolder(run_dir).export / fmt / f"model{suffix}"
    elif Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        path = Path(out) / f"model{suffix}"
    elif Path(out).suffix != suffix:
        raise ValueError(f"--out '{out}' must end with {suffix} for --format {fmt} (the .json and .safetensors go "
                         f"beside it, same stem), or name a folder to write model{suffix} into")
    else:
        path = Path(out)
    for target in (path, path.with_suffix(SIDECAR_SUFFIX), path.with_suffix(".safetensors")):
        folder = checkpoint_folder_of(target)
        if folder is not None:
            raise ValueError(f"--out '{out}' would write {target.name} into the checkpoint folder '{folder}'; export "
                             f"never writes into a run's checkpoints: choose a path outside them (default "
                             f"{RunFolder(run_dir).export / fmt}/)")
    return path


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, tolerance: float = TOLERANCE,
               checkpoint: str | None = None) -> Exported:
    """Export the run's best weights (or those of checkpoint folder `checkpoint`) to `out` (see output_path), checked
    for parity first; the sidecar (.json) and the weights with metadata (.safetensors) are written beside it, same
    stem."""
    from pipeline.checkpointing.checkpointer import model_state
    from pipeline.run.loaded import load_run

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not valid; choose one of {', '.join(FORMATS)}")
    path = output_path(Path(run_dir), fmt, out)
    run = load_run(run_dir, checkpoint)
    model = run.model.to("cpu").float().eval()
    images = parity_images(run)
    metadata = export_metadata(run, fmt)
    with tempfile.TemporaryDirectory(prefix="pipeline-export-") as tmp:
        staged = Path(tmp) / path.name
        WRITERS[fmt](model, images[:2], staged)
        diff = max_abs_diff(model, load_exported(staged, fmt), images)
        if not diff <= tolerance:  # NaN fails too
            raise ValueError(f"the {fmt} export does not match the PyTorch model: max abs diff of logits {diff:.3g} "
                             f"> {tolerance:g} on {len(images)} validation images; nothing written")
        metadata.update({"max_abs_diff": diff, "parity_images": len(images), "tolerance": tolerance})
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), path)
    sidecar = path.with_suffix(SIDECAR_SUFFIX)
    sidecar.write_text(json.dumps(metadata, indent=2) + "\n")
    weights = path.with_suffix(".safetensors")
    save_file(model_state(model), str(weights), metadata={k: json.dumps(v) for k, v in metadata.items()})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; the weights are as readable as the model beside them
    return Exported(path, sidecar, weights, diff, metadata)


def read_sidecar(path: str | Path) -> dict:
    """The metadata written next to an exported model (model.pt -> model.json)."""
    sidecar = Path(path).with_suffix(SIDECAR_SUFFIX)
    if not sidecar.is_file():
        raise FileNotFoundError(f"'{path}' has no sidecar '{sidecar.name}' beside it; export it with pipeline export")
    return json.loads(sidecar.read_text())


__all__ = ["CODE_FORMATS", "FORMATS", "Exported", "export_run", "load_exported", "output_path", "read_sidecar"]
