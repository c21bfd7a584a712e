"""Build report.html from a run folder: config, data, curves, training signals, diagnosis, test metrics,
per-class table, confusion matrix, first-conv filters, feature maps and a Grad-CAM gallery.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from pipeline.commands.diagnose import diagnose, mixes, read_history, task_chance
from pipeline.commands.visualize import (
    confusion_png,
    curves_png,
    default_feature_layers,
    feature_maps,
    feature_maps_png,
    filters_png,
    first_conv_weight,
    gradcam_gallery,
    predict_split,
    signals_png,
    to_display,
)
from pipeline.data.dataset.resolve import uses_specs
from pipeline.data.dataset.specs import describe
from pipeline.evaluation.analysis import analyse, confusion_matrix
from pipeline.run.loaded import load_run
from pipeline.run.summary import DETAIL_COLUMNS, HEADLINES
from pipeline.run_folder import RunFolder

# (id, title) of every section, in page order; the Chromium test checks each exists.
SECTIONS = (("config", "Configuration"), ("data", "Data"), ("curves", "Training curves"),
            ("signals", "Training signals"), ("diagnosis", "Diagnosis"), ("test-metrics", "Test metrics"),
            ("per-class", "Per-class metrics"), ("confusion-matrix", "Confusion matrix"),
            ("filters", "First-layer filters"), ("feature-maps", "Feature maps"), ("gradcam", "Grad-CAM"))

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}section{border-top:1px solid #ddd;margin-top:1.5em}table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
img{max-width:100%}.finding{background:#f8f8f8;border-left:4px solid #c33;padding:.4em 1em;margin:.6em 0}
.finding.healthy{border-color:#393}pre{background:#f6f6f6;padding:.6em;overflow:auto;max-height:360px;font-size:12px}
.muted{color:#777}"""


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f"<p class='muted'>{html.escape(alt)}: nothing to show.</p>"
    data = base64.b64encode(png).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    head = "".join(f"<th class='{'l' if i < left else ''}'>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{html.escape(str(c))}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _findings_html(findings) -> str:
    parts = []
    for f in findings:
        items = "".join(f"<li>{html.escape(e)}</li>" for e in f.evidence)
        remedies = "".join(f"<li>{html.escape(r)}</li>" for r in f.remedies)
        parts.append(f"<div class='finding {f.kind}' data-kind='{f.kind}'><b>{html.escape(f.summary)}</b>"
                     f"<ul>{items}</ul>" + (f"<p>What to try:</p><ul>{remedies}</ul>" if remedies else "") + "</div>")
    return "".join(parts)


def build_report(run_dir: str | Path) -> tuple[str, dict[str, bytes]]:
    """The report's HTML and its images by name (the same images go to W&B)."""
    from pipeline.config import to_yaml

    run = load_run(run_dir)
    history = read_history(run.run_dir)
    cfg, rcfg, classes = run.cfg, run.cfg.report, run.classes
    preds = predict_split(run, "test")
    counts = run.manifest.split("train").class_counts
    test_file = run.folder.test_metrics
    saved = json.loads(test_file.read_text()) if test_file.is_file() else {}
    images: dict[str, bytes | None] = {"curves": curves_png(history), "signals": signals_png(history),
                                       "filters": filters_png(first_conv_weight(run.model))}
    classifies = run.task.type == "classification"
    per_class, bodies = _classification_bodies(run, preds, saved, images) if classifies else \
        _task_bodies(run, preds, saved)
    findings = diagnose(history, task_chance(cfg, classes), counts if run.task.type != "regression" else None,
                        per_class, lr=cfg.optim.lr, mixed_targets=mixes(cfg))

    layers = list(rcfg.feature_map_layers) or default_feature_layers(run.model)
    for i in range(min(rcfg.sample_images, len(preds.images))):
        maps = feature_maps(run.model, preds.images[i:i + 1].to(run.device), layers)
        shown = to_display(preds.images[i], cfg.data.mean, cfg.data.std)
        images[f"feature_maps_{i}"] = feature_maps_png(shown, {k: v[0] for k, v in maps.items() if v.ndim == 4},
                                                       rcfg.feature_map_channels,
                                                       f"test image {i}: true {_truth(run, preds.labels[i])}")
    split_rows = [[name, info.num_samples, len(info.shards)] for name, info in run.manifest.splits.items()]
    shards = describe(cfg.data.train) if uses_specs(cfg.data) else cfg.data.root
    data_html = (f"<p>Shards: <code>{html.escape(shards)}</code>; {html.escape(run.task.counted())}; images "
                 f"{cfg.data.image_size}x{cfg.data.image_size}, {cfg.data.channels} channel(s).</p>"
                 + _table(["split", "images", "shards"], split_rows)
                 + f"<p>Training images per {run.task.class_word}:</p>"
                 + _table(list(counts), [list(counts.values())], left=0))
    last = history[-1]
    config_html = (f"<p>Model <b>{html.escape(cfg.model.name)}</b> {list(cfg.model.channels)}, optimizer "
                   f"{cfg.optim.name} lr {cfg.optim.lr}, {cfg.scheduler.name} schedule, {len(history)}/"
                   f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.train.precision}. Weights shown: "
                   f"<code>{html.escape(str(run.checkpoint))}</code>.</p>"
                   f"<details><summary>Full config.yaml</summary><pre>{html.escape(to_yaml(cfg))}</pre></details>")
    signals_note = (f"<p>Last epoch: global gradient norm {last['grad_norm/global']:.3g}, non-finite steps "
                    f"{100 * last['nonfinite_step_fraction']:.1f}%, {last['images_per_second']:.0f} images/s.</p>"
                    if "grad_norm/global" in last else "")
    fm = "".join(_img(images[k], k) for k in images if k.startswith("feature_maps_"))
    bodies.update({
        "config": config_html, "data": data_html, "curves": _img(images["curves"], "training curves"),
        "signals": signals_note + _img(images["signals"], "training signals (not logged by this run)"),
        "diagnosis": _findings_html(findings),
        "filters": f"<p>{html.escape(default_feature_layers(run.model)[0])}: one tile per output channel.</p>"
                   + _img(images["filters"], "first-layer filters"),
        "feature-maps": f"<p>Layers: {html.escape(', '.join(layers))}.</p>" + fm,
    })
    sections = "".join(f"<section id='{sid}'><h2>{title}</h2>{bodies[sid]}</section>" for sid, title in SECTIONS)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Run report: {html.escape(cfg.run.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>Run report: {html.escape(cfg.run.name)}</h1>"
            f"<p class='muted'>{html.escape(str(run.run_dir))} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
            f"{sections}</body></html>")
    return page, {k: v for k, v in images.items() if v is not None}


def _classification_bodies(run, preds, saved: dict, images: dict) -> tuple[list[dict], dict[str, str]]:
    """(per-class rows, the sections of a classifier's results): test metrics, per class, confusion, Grad-CAM."""
    classes, rcfg = run.classes, run.cfg.report
    details = analyse(preds.probs, preds.labels, classes)
    confusion = confusion_matrix(preds.predicted, preds.labels, len(classes)).tolist()
    images["confusion_matrix"] = confusion_png(confusion, classes)
    images["gradcam_correct"] = gradcam_gallery(run, preds, rcfg.gradcam_examples, correct=True)
    images["gradcam_wrong"] = gradcam_gallery(run, preds, rcfg.gradcam_examples, correct=False)
    accuracy = float((preds.predicted == preds.labels).float().mean())
    summary_rows = [["accuracy", f"{accuracy:.4f}"]] + [[k, f"{v:.4f}"] for k, v in details["top_k"].items()]
    summary_rows.append(["expected calibration error", f"{details['ece']:.4f}"])
    summary_rows += [[k, f"{saved[k]:.4f}"] for k in ("loss", "f1_macro", "auroc") if isinstance(saved.get(k), float)]
    summary_rows.append(["test images", len(preds.labels)])
    confused = _table(["true", "predicted", "count"], [[p["true"], p["predicted"], p["count"]]
                                                       for p in details["most_confused"]], left=2)
    per_class = _table(["class", "precision", "recall", "F1", "support"],
                       [[r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                        for r in details["per_class"]])
    return details["per_class"], {
        "test-metrics": _table(["metric", "value"], summary_rows) + "<p>Most-confused pairs:</p>" + confused,
        "per-class": per_class, "confusion-matrix": _img(images["confusion_matrix"], "confusion matrix"),
        "gradcam": "<h3>Correctly classified</h3>" + _img(images["gradcam_correct"], "correct Grad-CAM")
                   + "<h3>Misclassified</h3>" + _img(images["gradcam_wrong"], "misclassified Grad-CAM")}


def _task_bodies(run, preds, saved: dict) -> tuple[None, dict[str, str]]:
    """The result sections of a multilabel or regression run: its headline metrics (as test_metrics.json recorded
    them) and its table per class or per output, recomputed from the test predictions; the confusion matrix and the
    Grad-CAM of right and wrong classifications are for one class per image, and say so."""
    kind = run.task.type
    details = run.task.analyse(preds.probs, preds.labels)
    rows = [[label, f"{saved[key]:.4f}"] for label, key in HEADLINES[kind] if isinstance(saved.get(key), float)]
    rows += [["loss", f"{saved['loss']:.4f}"]] if isinstance(saved.get("loss"), float) else []
    rows.append(["test images", len(preds.labels)])
    key, columns = DETAIL_COLUMNS[kind]
    detail = _table([label for label, _ in columns], [[r[name] if isinstance(r[name], (str, int)) else
                                                       f"{r[name]:.4f}" for _, name in columns] for r in details[key]])
    skipped = (f"<p class='muted'>task.type={kind}: not shown; a confusion matrix and Grad-CAM of right and wrong "
               "classifications need one class per image (see the table per "
               f"{run.task.class_word} above).</p>")
    extra = "".join(f"<p>{html.escape(k)} labels per image: {v:.2f}</p>"
                    for k, v in details.get("labels_per_image", {}).items())
    return None, {"test-metrics": _table(["metric", "value"], rows) + extra, "per-class": detail,
                  "confusion-matrix": skipped, "gradcam": skipped}


def _truth(run, label) -> str:
    """A test image's label in words: its class, its classes (multilabel) or its values (regression)."""
    if run.task.type == "regression":
        return ", ".join(f"{v:.3g}" for v in label.tolist())
    if run.task.type == "multilabel":
        return ", ".join(c for c, v in zip(run.classes, label.tolist()) if v > 0.5) or "none"
    return run.classes[int(label)]


def write_report(run_dir: str | Path, out: str | Path | None = None, tracker=None) -> tuple[Path, float]:
    """Write report.html (default: in the run folder); log its images to `tracker` if given. Returns path, seconds."""
    started = time.perf_counter()
    page, images = build_report(run_dir)
    path = Path(out) if out else RunFolder(run_dir).report
    path.write_text(page)
    if tracker is not None and hasattr(tracker, "log_images"):
        tracker.log_images({f"report/{k}": v for k, v in images.items()})
    return path, time.perf_counter() - started
