"""End to end on one tiny real run (trained once per module): training signals in metrics.jsonl, the richer
`pipeline evaluate`, `predict`, `diagnose`, `visualize`, `report` (written at the end of training because
report.enabled=true), and the report opened in headless Chromium.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.commands.cli import main
from pipeline.commands.report import SECTIONS, write_report
from pipeline.commands.train import train
from pipeline.config import load_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
EPOCHS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insight")
    cfg = load_config("configs/default.yaml", [
        f"data.root={root / 'shards'}", "data.auto_prepare_digits=true", "data.num_workers=0", "model.channels=[8,16]",
        f"train.epochs={EPOCHS}",
        f"run.output_dir={root / 'runs'}", "run.name=tiny", "logging.wandb_mode=disabled", "logging.progress=false",
        "report.enabled=true", "report.gradcam_examples=3", "report.sample_images=1"])
    train(cfg)
    return root / "runs" / "tiny"


def test_training_signals_are_in_every_epoch_record(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    groups = ["features.0", "features.1", "head.2"]
    expected = {"grad_norm/global", "grad_norm/global_max", *(f"grad_norm/{g}" for g in groups), "weight_norm/global",
                *(f"weight_norm/{g}" for g in groups), "lr/decay", "lr/no_decay", "nonfinite_step_fraction",
                "images_per_second"}
    for record in records:
        assert expected <= set(record)
        assert record["nonfinite_step_fraction"] == 0.0
        assert record["lr/decay"] == record["lr/no_decay"] == record["lr"]
        assert 0 < record["grad_norm/global"] <= record["grad_norm/global_max"]
        group_norm = math.sqrt(sum(record[f"weight_norm/{g}"] ** 2 for g in groups))
        assert record["weight_norm/global"] == pytest.approx(group_norm, rel=1e-9)
    # the last record's weight norm is the norm of the weights saved in checkpoints/last
    weights = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    trainable = [v for k, v in weights.items() if "running_" not in k and "num_batches" not in k]
    norm = float(torch.cat([v.float().flatten() for v in trainable]).norm())
    assert records[-1]["weight_norm/global"] == pytest.approx(norm, rel=1e-5)


def test_evaluate_adds_per_class_topk_ece_and_confused_pairs(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in result["per_class"]] == [str(i) for i in range(10)]
    assert sum(r["support"] for r in result["per_class"]) == result["num_samples"] == 270
    assert [r["support"] for r in result["per_class"]] == [sum(row) for row in result["confusion_matrix"]]
    assert result["top_k"]["top1"] == pytest.approx(result["accuracy"], abs=1e-6)
    assert result["top_k"]["top1"] <= result["top_k"]["top3"] <= result["top_k"]["top5"] <= 1.0
    assert 0.0 <= result["ece"] <= 1.0
    errors = sum(result["confusion_matrix"][i][j] for i in range(10) for j in range(10) if i != j)
    assert sum(p["count"] for p in result["most_confused"]) <= errors
    assert all(p["true"] != p["predicted"] for p in result["most_confused"])


def test_predict_prints_top_k_json_for_files_and_folders(run_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    assert main(["predict", str(run_dir), str(folder), str(folder / "1.png"), "--top-k", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in results] == ["0.png", "1.png", "2.png", "1.png"]
    for r in results:
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    assert results[1] == results[3]
    assert main(["predict", str(run_dir), str(tmp_path / "nope.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: '{tmp_path / 'nope.png'}' is neither an image file nor a folder"


def test_diagnose_cli_text_and_json(run_dir, capsys):
    assert main(["diagnose", str(run_dir), "--json"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert findings and all({"kind", "summary", "evidence", "remedies", "epoch"} <= set(f) for f in findings)
    assert main(["diagnose", str(run_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"[{findings[0]['kind']}] ")


def test_visualize_writes_feature_maps_and_gradcam(run_dir, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.new("L", (8, 8), color=128).save(image)
    out = tmp_path / "look.png"
    assert main(["visualize", str(run_dir), "--layer", "features.1.0.0", "--image", str(image), "--out", str(out)]) == 0
    for path in (out, tmp_path / "look_gradcam.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["visualize", str(run_dir), "--layer", "nope", "--image", str(image)]) == 2
    assert capsys.readouterr().err.startswith("error: layer 'nope' not found in the model; valid layers: features,")


def test_report_written_at_end_of_training_with_every_section(run_dir):
    page = (run_dir / "report.html").read_text()
    assert re.findall(r"<section id='([^']+)'>", page) == [sid for sid, _ in SECTIONS]
    images = re.findall(r"src='data:image/png;base64,", page)
    assert len(images) == 7  # curves, signals, confusion matrix, filters, 1 feature-map sample, 2 Grad-CAM galleries
    assert "src='http" not in page and "src=\"http" not in page  # self-contained


class RecordingTracker:
    def __init__(self):
        self.images: dict[str, bytes] = {}

    def log_images(self, images: dict[str, bytes]) -> None:
        self.images.update(images)


def test_report_images_go_to_the_tracker_and_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    tracker = RecordingTracker()
    path, seconds = write_report(run_dir, tmp_path / "again.html", tracker=tracker)
    assert path == tmp_path / "again.html" and path.stat().st_size > 10_000 and seconds > 0
    assert sorted(tracker.images) == ["report/confusion_matrix", "report/curves", "report/feature_maps_0",
                                      "report/filters", "report/gradcam_correct", "report/gradcam_wrong",
                                      "report/signals"]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in tracker.images.values())
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"error: run folder '{tmp_path / 'nowhere'}' does not exist"


PROBE = """<script>window.addEventListener('load', () => {
  const images = [...document.images];
  const result = {images: images.length, loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
                  sections: [...document.querySelectorAll('section')].map(s => s.id)};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    page = (run_dir / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    match = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert match, "the probe script did not run in Chromium"
    result = json.loads(match.group(1).replace("&quot;", '"'))
    assert result["sections"] == [sid for sid, _ in SECTIONS]
    assert result["images"] == 7 and result["loaded"] == 7  # every image decoded (naturalWidth > 0)
    shot = tmp_path / "report.png"
    _chromium("--window-size=1200,2400", f"--screenshot={shot}", (run_dir / "report.html").as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        assert len(image.convert("L").getcolors(1 << 16) or []) > 10  # rendered content, not a blank page


def _grid(text: str, num_classes: int) -> list[list[int]]:
    """The confusion matrix read back from `pipeline evaluate`'s grid (rows of the table after its title)."""
    lines = text[text.index("confusion matrix"):].splitlines()
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert len(rows) == num_classes and all(len(r) == num_classes + 1 for r in rows)
    return [[0 if cell == "." else int(cell) for cell in row[1:]] for row in rows]


def test_evaluate_prints_tables_and_the_grid_by_default(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert f"accuracy           {result['accuracy']:.4f}" in text and "samples            270" in text
    per_class = text[text.index("per class"):text.index("confusion matrix")]
    assert sum(line.startswith("│") for line in per_class.splitlines()) == 10
    assert f"│ 3     │ {result['per_class'][3]['precision']:9.3f} │" in per_class
    assert _grid(text, 10) == result["confusion_matrix"]


def test_report_evaluate_and_test_metrics_agree_to_the_last_digit(tmp_path):
    """One computation, one answer: a bf16 run (autocast changes the logits' last bits, and a few argmaxes with them)
    has the same accuracy and confusion matrix in report.html, `pipeline evaluate` and test_metrics.json."""
    from pipeline.commands.evaluate import evaluate_run
    from pipeline.commands.report.report import build_report

    cfg = load_config("configs/default.yaml", [
        f"data.root={tmp_path / 'shards'}", "data.auto_prepare_digits=true", "data.num_workers=0",
        "model.channels=[8,16]", "train.epochs=1", "train.precision=bf16", f"run.output_dir={tmp_path / 'runs'}",
        "run.name=bf16", "logging.wandb_mode=disabled", "logging.progress=false", "report.gradcam_examples=1",
        "report.sample_images=0"])
    train(cfg)
    run_dir = tmp_path / "runs" / "bf16"
    evaluated = evaluate_run(run_dir)
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    page, _ = build_report(run_dir)
    shown = re.search(r"<td class='l'>accuracy</td><td class=''>([0-9.]+)</td>", page).group(1)
    assert shown == f"{evaluated['accuracy']:.4f}" == f"{saved['accuracy']:.4f}"
    assert evaluated["confusion_matrix"] == saved["confusion_matrix"]
    # The same probabilities, bit for bit (the report once ran the model without the run's autocast: its argmax
    # differed from evaluate's on 3 of 10,000 CIFAR-10 test images).
    from pipeline.commands.visualize import predict_split
    from pipeline.evaluation.evaluate import collect_predictions
    from pipeline.run.loaded import load_run

    run = load_run(run_dir)
    probs, labels = collect_predictions(run.model, run.loader("test"), run.device, run.dist.accelerator.autocast,
                                        run.cfg.model.channels_last)
    preds = predict_split(run)
    assert torch.equal(preds.probs, probs) and torch.equal(preds.labels, labels)
    rows = re.findall(r"<tr><td class='l'>([^<]+)</td><td class=''>([0-9.]+)</td><td class=''>([0-9.]+)</td>"
                      r"<td class=''>([0-9.]+)</td><td class=''>(\d+)</td></tr>", page)
    assert [(r[0], r[1], r[2], r[3], int(r[4])) for r in rows] == [
        (str(c["class"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"])
        for c in evaluated["per_class"]]
