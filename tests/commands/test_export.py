"""`pipeline export`: parity checked by the command itself (TorchScript and torch.export without extras; ONNX with
the [export] extra), the sidecar and safetensors metadata, a mismatch refused, predict from an exported model; where
an export may write (never into checkpoints), and what predict loads without --trust-code (nothing that runs code)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import pipeline.commands.export as export
from pipeline.commands.cli import main
from pipeline.commands.train import train
from pipeline.config import load_config
from tests.conftest import ROOT, TINY, run_cli
from tests.support.run_folders import snapshot


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
    assert main(["predict", str(written["path"]), str(tmp_path), "--json", "--trust-code"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert [[t["class"] for t in r["top_k"]] for r in from_export] == [[t["class"] for t in r["top_k"]]
                                                                         for r in from_run]
    assert [t["probability"] for r in from_export for t in r["top_k"]] == pytest.approx(
        [t["probability"] for r in from_run for t in r["top_k"]], abs=1e-6)


# ---- what predict trusts (issue 26, item 8) ----------------------------------------------------------------
class _Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_code(program: Path, marker: Path) -> None:
    """Edit a torch.export .pt2 as a stranger could: its first weight becomes a pickle (use_pickle: true in the
    weights config) whose unpickling creates `marker`; torch.export.load unpickles such weights with
    weights_only=False."""
    with zipfile.ZipFile(program) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    config_name = next(info.filename for info, _ in entries if info.filename.endswith("/model_weights_config.json"))
    config = json.loads(dict((i.filename, d) for i, d in entries)[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    payload = io.BytesIO()
    torch.save(_Exploit(marker), payload)
    with zipfile.ZipFile(program, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename == config_name:
                data = json.dumps(config).encode()
            elif info.filename.endswith(f"/data/weights/{first['path_name']}"):
                data = payload.getvalue()
            archive.writestr(info, data)


def _images(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    return folder


def test_predict_never_runs_code_planted_in_an_exported_model_without_trust_code(run_dir: Path, tmp_path: Path,
                                                                                    capsys) -> None:
    _, written = _export(run_dir, "exported", capsys, "--out", str(tmp_path / "model.pt2"))
    program, marker = written["path"], tmp_path / "pwned"
    plant_code(program, marker)
    images = _images(tmp_path / "images")
    before = snapshot(tmp_path)
    started = time.monotonic()
    refused = run_cli(["predict", str(program), str(images)], check=False, timeout=120)
    seconds = time.monotonic() - started
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.splitlines() == [
        f"error: '{program}' is a torch.export program, and loading one runs the code inside it; predict from "
        f"'{program.with_suffix('.safetensors')}' (weights only, written beside it by pipeline export), or pass "
        f"--trust-code if you trust this file"]
    assert refused.stdout == "" and not marker.exists() and snapshot(tmp_path) == before
    print(f"predict refused: exit {refused.returncode} in {seconds:.1f} s")
    assert seconds < 150, seconds  # the CLI's start (torch) only: the file is never opened; see REFUSED_WITHIN_S
    # the plant is real: with the flag, loading the file runs it
    trusted = run_cli(["predict", str(program), str(images), "--trust-code"], check=False, timeout=120)
    assert marker.exists() and trusted.returncode != 0


def test_torchscript_is_refused_without_trust_code_and_loads_with_it(run_dir: Path, tmp_path: Path, capsys) -> None:
    _, written = _export(run_dir, "torchscript", capsys, "--out", str(tmp_path / "ts.pt"))
    images = _images(tmp_path / "images")
    assert main(["predict", str(written["path"]), str(images)]) == 2
    assert capsys.readouterr().err.strip().endswith("or pass --trust-code if you trust this file")
    assert main(["predict", str(written["path"]), str(images), "--trust-code", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_predict_from_the_exported_safetensors_needs_no_trust_and_equals_the_run(run_dir: Path, tmp_path: Path,
                                                                                   capsys) -> None:
    _, written = _export(run_dir, "exported", capsys, "--out", str(tmp_path / "model.pt2"))
    images = _images(tmp_path / "images")
    assert main(["predict", str(run_dir), str(images), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", str(written["path"].with_suffix(".safetensors")), str(images), "--json"]) == 0
    from_weights = json.loads(capsys.readouterr().out)
    assert [[t["class"] for t in r["top_k"]] for r in from_weights] == [[t["class"] for t in r["top_k"]]
                                                                          for r in from_run]
    assert [t["probability"] for r in from_weights for t in r["top_k"]] == pytest.approx(
        [t["probability"] for r in from_run for t in r["top_k"]], abs=1e-6)


# ---- where an export writes (issue 26, item 10) ------------------------------------------------------------
@pytest.mark.parametrize("inside", ["checkpoints/best/model.pt", "checkpoints/last/model.pt", "checkpoints/model.pt"])
def test_export_never_writes_into_a_runs_checkpoints(run_dir: Path, capsys, inside: str) -> None:
    checkpoints = run_dir / "checkpoints"
    before = snapshot(checkpoints)
    started = time.monotonic()
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(run_dir / inside)]) == 2
    seconds = time.monotonic() - started
    folder = {"checkpoints/best/model.pt": checkpoints / "best", "checkpoints/model.pt": checkpoints,
              "checkpoints/last/model.pt": Path(os.path.realpath(checkpoints / "last"))}[inside]
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out '{run_dir / inside}' would write model.pt into the checkpoint folder '{folder}'; export never "
        f"writes into a run's checkpoints: choose a path outside them (default {run_dir / 'export' / 'torchscript'}/)"]
    assert snapshot(checkpoints) == before
    assert seconds < 5, seconds  # refused before the run is loaded


def test_out_naming_a_folder_writes_model_files_inside_it(run_dir: Path, tmp_path: Path, capsys) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    _, written = _export(run_dir, "torchscript", capsys, "--out", str(existing))
    assert written["path"] == existing / "model.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no existing.json, existing.safetensors
    assert sorted(p.name for p in existing.iterdir()) == ["model.json", "model.pt", "model.safetensors"]
    # Every file of an export gets the same permissions (safetensors alone used to write 0600).
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in existing.iterdir()}
    assert len(set(modes.values())) == 1, modes
    _, written = _export(run_dir, "torchscript", capsys, "--out", f"{tmp_path / 'new'}/")  # a folder to create
    assert written["path"] == tmp_path / "new" / "model.pt"


def test_out_with_another_formats_suffix_is_refused(run_dir: Path, tmp_path: Path, capsys) -> None:
    for out in ("model.safetensors", "model.json", "model.onnx"):
        assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / out)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: --out '{tmp_path / out}' must end with .pt for --format torchscript (the .json and .safetensors "
            f"go beside it, same stem), or name a folder to write model.pt into"]
    assert list(tmp_path.iterdir()) == []
