"""Visualisation of a loaded run: feature maps (forward hooks), first-conv filters, Grad-CAM, curves,
confusion matrix. Everything returns PNG bytes; `visualize_image` backs `pipeline visualize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.commands.visualize.hooks import (
    conv_layers,
    default_feature_layers,
    feature_maps,
    find_layer,
    first_conv_weight,
    grad_cam,
)
from pipeline.commands.visualize.plots import (
    confusion_png,
    curves_png,
    feature_maps_png,
    filters_png,
    gradcam_png,
    signals_png,
    to_display,
)


@dataclass
class TestPredictions:
    """The test split run through the model: normalised images, labels and probabilities (CPU)."""

    images: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        return self.probs.argmax(dim=-1)


def predict_split(run, split: str = "test") -> TestPredictions:
    """The split's predictions by the one eval loop `pipeline evaluate` uses (`collect_predictions`: the run's
    autocast, memory format and test-time augmentation), so the report's numbers are evaluate's to the last digit;
    the images are kept for the galleries."""
    from pipeline.evaluation.evaluate import collect_predictions

    images = []

    def keeping_images(batches):
        for batch, target in batches:
            images.append(batch)
            yield batch, target

    from pipeline.evaluation.tta import with_tta

    outputs = run.task.outputs if run.task is not None else None  # probabilities, or values (regression)
    probs, labels = collect_predictions(with_tta(run.model, run.cfg.eval.tta), keeping_images(run.loader(split)),
                                        run.device, run.dist.accelerator.autocast, run.cfg.model.channels_last,
                                        outputs)
    return TestPredictions(torch.cat(images), labels, probs)


def gradcam_gallery(run, preds: TestPredictions, count: int, correct: bool, layer: str | None = None) -> bytes | None:
    """Grad-CAM overlays (for the predicted class) of the first `count` correctly or wrongly classified images."""
    hits = (preds.predicted == preds.labels) == correct
    index = hits.nonzero().flatten()[:count]
    if len(index) == 0:
        return None
    layer = layer or conv_layers(run.model)[-1]
    cams, _ = grad_cam(run.model, layer, preds.images[index].to(run.device))
    data = run.cfg.data
    shown = [to_display(preds.images[i], data.mean, data.std) for i in index.tolist()]
    captions = [f"true {run.classes[int(preds.labels[i])]}\npred {run.classes[int(preds.predicted[i])]} "
                f"({float(preds.probs[i].max()):.2f})" for i in index.tolist()]  # two lines: narrow tiles
    return gradcam_png(shown, cams, captions)


def visualize_image(run_dir: str | Path, layer: str, image: str | Path, out: str | Path | None = None,
                    channels: int = 16) -> Path:
    """Feature maps of `layer` for one image file, plus its Grad-CAM at that layer when it is spatial."""
    from pipeline.commands.predict import image_paths, preprocess
    from pipeline.run.loaded import load_run

    if channels < 1:
        raise ValueError(f"--channels={channels} must be at least 1")
    run = load_run(run_dir)
    find_layer(run.model, layer)
    paths = image_paths([image])
    batch = preprocess(run, paths[:1]).to(run.device)
    maps = feature_maps(run.model, batch, [layer])
    activation = maps[layer]
    if activation.ndim != 4:
        raise ValueError(f"layer {layer!r} gives output of shape {tuple(activation.shape)}; pick a convolutional "
                         "layer (4-D output)")
    shown = to_display(batch[0].cpu(), run.cfg.data.mean, run.cfg.data.std)
    cams, logits = grad_cam(run.model, layer, batch)
    probs = logits.softmax(dim=-1)[0]
    label = run.classes[int(probs.argmax())]
    title = f"{paths[0].name}: predicted {label} ({float(probs.max()):.2f})"
    out = Path(out) if out else run.folder.visualize / f"{layer.replace('.', '_')}_{paths[0].stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(feature_maps_png(shown, {layer: activation[0]}, channels, title))
    out.with_name(out.stem + "_gradcam.png").write_bytes(gradcam_png([shown], cams, [f"Grad-CAM at {layer}: {label}"]))
    return out


__all__ = ["TestPredictions", "gradcam_gallery", "predict_split", "visualize_image",
           # the pieces the report draws with
           "confusion_png", "curves_png", "default_feature_layers", "feature_maps", "feature_maps_png", "filters_png",
           "first_conv_weight", "signals_png", "to_display"]
