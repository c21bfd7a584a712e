"""`pipeline predict RUN_DIR IMAGE_OR_FOLDER...`: top-k classes with probabilities for image files, using
the run's own evaluation transform and best weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.images import to_mode
from pipeline.data.transforms import build_transform
from pipeline.evaluation.loaded import LoadedRun, load_run

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
    try:
        with Image.open(path) as image:
            return to_mode(image, "L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"'{path}' is not a readable image ({type(exc).__name__})") from None


def preprocess(run: LoadedRun, paths: Sequence[Path]) -> torch.Tensor:
    transform = build_transform(run.cfg.data, train=False)
    return torch.stack([transform(load_image(p, run.cfg.data.channels)) for p in paths])


def predict_paths(run: LoadedRun, paths: Sequence[Path], top_k: int = 3) -> list[dict]:
    """For each image: its path and the top-k classes with their probabilities, most likely first."""
    k = min(top_k, run.manifest.num_classes)
    results = []
    for start in range(0, len(paths), BATCH):
        chunk = list(paths[start:start + BATCH])
        with torch.inference_mode():
            probs = run.model(preprocess(run, chunk).to(run.device)).float().softmax(dim=-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for path, p, i in zip(chunk, values.tolist(), indices.tolist()):
            results.append({"path": str(path), "top_k": [{"class": run.classes[c], "probability": q}
                                                         for c, q in zip(i, p)]})
    return results


def predict(run_dir: str | Path, inputs: Sequence[str | Path], top_k: int = 3) -> list[dict]:
    if top_k < 1:
        raise ValueError(f"--top-k={top_k} must be at least 1")
    paths = image_paths(inputs)
    return predict_paths(load_run(run_dir), paths, top_k)


def format_predictions(results: list[dict]) -> str:
    return "\n".join(f"{r['path']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
                     for r in results)
