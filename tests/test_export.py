"""`pipeline export`: parity checked by the command itself (TorchScript and torch.export without extras; ONNX with
the [export] extra), the sidecar and safetensors metadata, a mismatch refused, predict from an exported model."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import pipeline.commands.export as export
from pipeline.commands.cli import main
from pipeline.commands.train import train
from pipeline.config import load_config
from tests.conftest import ROOT, TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root: Path) -> Path:
    out = tmp_path_factory.mktemp("export")
    train(load_config(ROOT / "configs" / "default.yaml", [
        f"data.root={digits_root}", f"run.output_dir={out}", "run.name=r", "data.num_workers=0", "train.epochs=1",
        *TINY]))
    return out / "r"


def _export(run_dir: Path, fmt: str, capsys, *extra: str) -> tuple[float, dict]:
    assert main(["export", str(run_dir), "--format", fmt, *extra]) == 0
    out = capsys.readouterr().out
    diff = float(re.search(r"max abs diff of logits (\S+) on 32 validation images", out).group(1))
    path = Path(re.search(r"wrote (\S+) ", out).group(1))
    return diff, {"path": path, "sidecar": json.loads(path.with_suffix(".json").read_text())}


def _check_metadata(run_dir: Path, path: Path, sidecar: dict, fmt: str) -> None:
    run_info = json.loads((run_dir / "run_info.json").read_text())
    assert sidecar["format"] == fmt and sidecar["model"] == "simple_cnn"
    assert sidecar["classes"] == [str(i) for i in range(10)] and sidecar["num_classes"] == 10
    assert (sidecar["channels"], sidecar["image_size"], sidecar["mean"], sidecar["std"]) == (1, 8, [0.5], [0.5])
    assert sidecar["config_sha256"] == hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    assert sidecar["git_commit"] == run_info["git_commit"]
    assert sidecar["parity_images"] == 32 and sidecar["max_abs_diff"] <= sidecar["tolerance"] == 1e-4
    with safe_open(str(path.with_suffix(".safetensors")), "pt") as weights:
        assert {k: json.loads(v) for k, v in weights.metadata().items()} == sidecar
        assert "head.2.weight" in weights.keys()


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_export_is_checked_for_parity_and_carries_its_metadata(run_dir: Path, capsys, fmt: str) -> None:
    diff, written = _export(run_dir, fmt, capsys)
    path, sidecar = written["path"], written["sidecar"]
    assert path == run_dir / "export" / fmt / f"model{export.FORMATS[fmt]}" and diff == sidecar["max_abs_diff"]
    assert diff <= 1e-5  # the same fp32 kernels on the CPU
    _check_metadata(run_dir, path, sidecar, fmt)
    model = export.load_exported(path, fmt)
    for batch in (1, 3, 7):  # the batch size is dynamic
        assert tuple(model(torch.zeros(batch, 1, 8, 8)).shape) == (batch, 10)


def test_onnx_export_parity(run_dir: Path, capsys) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX export needs the [export] extra (onnx, onnxruntime)")
    pytest.importorskip("onnx", reason="ONNX export needs the [export] extra (onnx, onnxruntime)")
    diff, written = _export(run_dir, "onnx", capsys, "--out", str(run_dir / "deploy" / "digits.onnx"))
    assert written["path"] == run_dir / "deploy" / "digits.onnx" and diff <= 1e-4
    _check_metadata(run_dir, written["path"], written["sidecar"], "onnx")


def test_a_mismatching_export_is_refused_and_nothing_is_written(run_dir: Path, capsys, monkeypatch) -> None:
    loader = export.load_exported
    monkeypatch.setattr(export, "load_exported", lambda path, fmt: (lambda x: loader(path, fmt)(x) + 1e-3))
    out = run_dir / "refused" / "model.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the torchscript export does not match the PyTorch model: max abs diff of logits 0\.001\d* "
                     r"> 0\.0001 on 32 validation images; nothing written", err), err
    assert not (run_dir / "refused").exists()


def test_predict_with_an_exported_model_equals_predict_with_the_run(run_dir: Path, tmp_path: Path, capsys) -> None:
    _, written = _export(run_dir, "exported", capsys)
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(tmp_path / f"{i}.png")
    assert main(["predict", str(run_dir), str(tmp_path), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", str(written["path"]), str(tmp_path), "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert [[t["class"] for t in r["top_k"]] for r in from_export] == [[t["class"] for t in r["top_k"]]
                                                                         for r in from_run]
    assert [t["probability"] for r in from_export for t in r["top_k"]] == pytest.approx(
        [t["probability"] for r in from_run for t in r["top_k"]], abs=1e-6)
