"""`pipeline predict RUN_DIR|EXPORTED_MODEL IMAGE_OR_FOLDER...`: top-k classes with probabilities for image files,
using the run's own evaluation transform and best weights, or a model written by `pipeline export` and its sidecar.

What predict trusts: it loads by default only what cannot run code: a run folder's safetensors weights, the
`.safetensors` an export writes (weights and metadata; the architecture is rebuilt from the recorded model config,
a name looked up among ours and torchvision's), and ONNX (run by onnxruntime). TorchScript (.pt) and torch.export
(.pt2) files run the code inside them when loaded; they are refused with one line unless --trust-code is given.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from pipeline.config.schema import AugmentConfig, DataConfig, ModelConfig
from pipeline.data.samples.images import ImageTooLarge, open_image, to_mode
from pipeline.data.samples.transforms import build_transform
from pipeline.errors import first_line
from pipeline.evaluation.tta import tta_views, with_tta
from pipeline.run.loaded import LoadedRun, load_run
from pipeline.tasks import Task, task_from_state

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BATCH = 64


def image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted) to the image files inside them."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"'{path}' is neither an image file nor a folder")
    if not paths:
        raise ValueError("no images given")
    return paths


def load_image(path: Path, channels: int) -> Image.Image:
    """The image at `path` in the mode the model reads; one-line ValueError for what is not a readable image,
    or is larger than PIL decodes safely (`open_image`)."""
    try:
        with open_image(path) as image:
            return to_mode(image, "L" if channels == 1 else "RGB")
    except ImageTooLarge as exc:
        raise ValueError(f"'{path}': {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"'{path}' is not a readable image ({type(exc).__name__})") from None


def preprocess(run: LoadedRun, paths: Sequence[Path]) -> torch.Tensor:
    return preprocess_with(run.cfg.data, paths)


def preprocess_with(data: DataConfig, paths: Sequence[Path]) -> torch.Tensor:
    """The images as the model saw them in evaluation: the eval transform of `data`, normalised, stacked."""
    transform = build_transform(data, train=False)
    return torch.stack([transform(load_image(p, data.channels)) for p in paths])


@dataclass
class Classifier:
    """What predict needs: a function from a normalised batch to logits, its classes, its input and its task (what
    the logits mean: `pipeline.tasks`)."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str]
    data: DataConfig
    device: torch.device
    task: Task


def classifier_from_run(run_dir: str | Path, tta: str | None = None, checkpoint: str | None = None) -> Classifier:
    """The run's best weights (EMA when it kept them; or the checkpoint folder `checkpoint`'s) with test-time
    augmentation `tta` (None: the run's eval.tta)."""
    run = load_run(run_dir, checkpoint)
    return Classifier(with_tta(run.model, run.cfg.eval.tta if tta is None else tta), run.classes, run.cfg.data,
                      run.device, run.task)


def _input_of(meta: dict) -> DataConfig:
    return DataConfig(image_size=meta["image_size"], channels=meta["channels"], mean=meta["mean"], std=meta["std"],
                      eval_crop_pct=meta.get("eval_crop_pct"),
                      augment=AugmentConfig(random_resized_crop=meta.get("random_resized_crop", False)))


def _tta_of(meta: dict, tta: str | None) -> str:
    """The test-time augmentation: `tta` when given, else what the export recorded."""
    return meta.get("tta", "none") if tta is None else tta


def classifier_from_weights(path: Path, tta: str | None = None) -> Classifier:
    """The `.safetensors` written by `pipeline export`: the recorded architecture, built here, with its weights (no
    code is loaded: safetensors holds tensors and a JSON header)."""
    from safetensors import SafetensorError, safe_open

    from pipeline.checkpointing import load_weights
    from pipeline.models import create_model

    try:
        with safe_open(str(path), "pt") as weights:
            meta = {k: json.loads(v) for k, v in (weights.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read '{path}' as safetensors weights written by pipeline export: "
                         f"{first_line(exc)}") from None
    if "model_config" not in meta or "classes" not in meta:
        raise ValueError(f"'{path}' does not record its architecture and classes (exported by an older version, or "
                         f"not by pipeline export); export the run again with pipeline export")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
    model = create_model(dataclasses.replace(model_cfg, compile=False), len(meta["classes"]), meta["channels"])
    try:
        load_weights(model, path)
    except RuntimeError as exc:
        raise ValueError(f"'{path}': its weights do not fit the recorded {model_cfg.name} "
                         f"({first_line(exc)})") from None
    return Classifier(with_tta(model.eval(), _tta_of(meta, tta)), list(meta["classes"]), _input_of(meta),
                      torch.device("cpu"), task_from_state(meta["classes"], meta.get("task")))


def classifier_from_export(path: str | Path, tta: str | None = None, trust_code: bool = False) -> Classifier:
    """A model written by `pipeline export`, with the input description and test-time augmentation of its sidecar
    JSON (`tta` overrides the latter). TorchScript and torch.export files run code when loaded: refused unless
    `trust_code`."""
    from pipeline.commands.export import CODE_FORMATS, FORMATS, load_exported, read_sidecar

    path = Path(path)
    if path.suffix == ".safetensors":
        return classifier_from_weights(path, tta)
    meta = read_sidecar(path)
    code = meta["format"] in CODE_FORMATS or path.suffix in (FORMATS[f] for f in CODE_FORMATS)
    if code and not trust_code:
        kind = "torch.export program" if meta["format"] == "exported" else "TorchScript model"
        raise ValueError(f"'{path}' is a {kind}, and loading one runs the code inside it; predict "
                         f"from '{path.with_suffix('.safetensors')}' (weights only, written beside it by pipeline "
                         f"export), or pass --trust-code if you trust this file")
    model = with_tta(load_exported(path, meta["format"]), _tta_of(meta, tta))
    return Classifier(model, list(meta["classes"]), _input_of(meta), torch.device("cpu"),
                      task_from_state(meta["classes"], meta.get("task")))


def predict_paths(model: Classifier, paths: Sequence[Path], top_k: int = 3) -> list[dict]:
    """For each image: its path and what the task reports: the top-k classes with their probabilities, most likely
    first (classification); every class at or above its threshold (multilabel, `labels`); the values (regression)."""
    results = []
    for start in range(0, len(paths), BATCH):
        chunk = list(paths[start:start + BATCH])
        with torch.inference_mode():
            outputs = model.task.outputs(model.logits(preprocess_with(model.data, chunk).to(model.device))).cpu()
        results += [{"path": str(path), **row} for path, row in zip(chunk, model.task.describe(outputs, top_k))]
    return results


def predict(source: str | Path, inputs: Sequence[str | Path], top_k: int = 3, tta: str | None = None,
            checkpoint: str | None = None, trust_code: bool = False) -> list[dict]:
    """Top-k for the images, with a run folder's best weights or a file written by `pipeline export` (TorchScript
    and torch.export files only with `trust_code`); `tta`: test-time augmentation (None: the run's eval.tta, or the
    exported model's sidecar)."""
    if top_k < 1:
        raise ValueError(f"--top-k={top_k} must be at least 1")
    if tta is not None:
        tta_views(torch.zeros(1, 1, 2, 2), tta)
    paths = image_paths(inputs)
    if Path(source).is_file():
        if checkpoint is not None:
            raise ValueError(f"--checkpoint is for a run folder; '{source}' is an exported model")
        model = classifier_from_export(source, tta, trust_code)
    else:
        model = classifier_from_run(source, tta, checkpoint)
    return predict_paths(model, paths, top_k)


def _shown(result: dict) -> str:
    if "values" in result:
        return ", ".join(f"{name} {value:.4g}" for name, value in result["values"].items())
    found = result.get("labels", result.get("top_k"))
    return ", ".join(f"{t['class']} {t['probability']:.3f}" for t in found) or "(no class at or above its threshold)"


def format_predictions(results: list[dict]) -> str:
    """One line per image: its classes with probabilities (top-k, or all above threshold), or its values."""
    return "\n".join(f"{r['path']}: {_shown(r)}" for r in results)


__all__ = ["Classifier", "format_predictions", "image_paths", "predict", "preprocess"]
