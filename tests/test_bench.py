"""CPU smoke runs of the benchmark scripts at tiny sizes: the JSON they write and the work they did."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import gpu_throughput, loader_throughput, loop_overhead

ROOT = Path(__file__).resolve().parents[1]


def test_loop_overhead_runs_the_real_trainer_and_a_bare_loop(tmp_path: Path, digits_root: Path) -> None:
    out = tmp_path / "loop.json"
    result = loop_overhead.main(["--steps", "4", "--repeats", "2", "--cases", "bf16_accum2_clip", "--no-lightning",
                                 "--threads", "0",
                                 "--out", str(out), "model.channels=[8,16]", "data.image_size=8",
                                 "train.batch_size=8", f"data.root={digits_root}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    case = result["cases"]["bf16_accum2_clip"]
    loops = {"bare PyTorch", "pipeline", "pipeline (no training signals)"}
    assert set(case["ms_per_step"]) == set(case["ratio_to_bare"]) == set(case["ratio_of_fastest_blocks"]) == loops
    assert case["precision"] == "bf16" and case["grad_accum_steps"] == 2 and case["max_grad_norm"] == 1.0
    assert all(len(times) == 2 and min(times) > 0 for times in case["ms_per_step_all"].values())
    assert case["ratio_to_bare"]["bare PyTorch"] == 1.0
    # Every loop really trained: (1 warm-up + 2 timed blocks) x 4 micro-batches / 2 accumulated = 6 optimizer steps.
    assert case["optimizer_steps"] == {name: 6 for name in loops}
    assert {"commit", "torch", "cpus"} <= result["environment"].keys()


def test_loader_throughput_reads_every_image_once_per_epoch(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    result = loader_throughput.main(["--images", "40", "--workers", "1", "--batch-size", "8", "--image-size", "32",
                                     "--source-size", "32", "--repeats", "2", "--work", str(tmp_path / "work"),
                                     "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = {"ImageFolder + transforms (classic)", "ImageFolder + transforms.v2 (ours)", "shards", "shards + draft",
             "shards, float batches from the workers", "shards + draft, uint8 out (GPU mode)"}
    assert set(result["images_per_epoch"]) == set(result["images_per_second"]) == names
    assert all(counts == [40, 40] for counts in result["images_per_epoch"].values())  # one slot: nothing dropped
    assert all(rate > 0 for rate in result["images_per_second"].values())
    assert result["speedup_vs"]["ImageFolder + transforms.v2 (ours)"]["ImageFolder + transforms.v2 (ours)"] == 1.0
    assert len(list((tmp_path / "work" / "imagefolder").rglob("*.jpg"))) == 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_gpu_throughput_refuses_without_cuda_in_one_line() -> None:
    result = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpu_throughput: no CUDA device here")


def test_gpu_throughput_smoke_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = gpu_throughput.main(["--allow-cpu", "--models", "resnet18", "--compile", "off", "--sources", "synthetic",
                                  "shards-gpu-decode", "--batch-size", "4", "--image-size", "32", "--steps", "2",
                                  "--warmup", "1", "--repeats", "1", "--shard-images", "12", "--workers", "0",
                                  "--matmul-size", "64", "--profile", "--work", str(tmp_path / "work"),
                                  "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    synthetic, shards = result["runs"]
    assert (synthetic["source"], shards["source"]) == ("synthetic", "shards-gpu-decode")
    assert shards["decode_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert synthetic["images_per_block"] == [2 * 4] and shards["images_per_block"] == [12]
    # ResNet-18 trains with ~3 x 1.8 GMAC = 10.9 GFLOP per 224 px image; 32 px has 49x fewer pixels.
    assert synthetic["flops_per_image"] == pytest.approx(10.9e9 / 49, rel=0.05)
    assert all(run["images_per_second"] > 0 and 0 < run["mfu"] for run in result["runs"])
    assert result["bf16_matmul_tflops"] > 0
    for run in result["runs"]:  # --profile: one more block each, its operator table beside the JSON
        profile = run["profile"]
        assert profile["wall_s"] > 0 and profile["main_process_cpu_s"] > 0 and 0 < profile["busy_fraction"] <= 1
        assert "aten::convolution" in (tmp_path / profile["table"]).read_text()


def test_gpu_benchmark_jpegs_need_no_scikit_learn(tmp_path: Path, monkeypatch) -> None:
    """A GPU machine's bare Python has no scikit-learn: the benchmark's JPEGs then come from random strokes."""
    from pipeline.data import Manifest

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    shards = gpu_throughput.make_shards(tmp_path, 30, 32)
    manifest = Manifest.read(shards)
    assert manifest.splits["train"].num_samples == 30 and len(manifest.classes) == 10
    jpegs = sorted((tmp_path / "jpegs-30").rglob("*.jpg"))
    assert len(jpegs) == 30 and all(32 <= side <= 40 for j in jpegs for side in Image.open(j).size)


def test_busy_time_counts_overlapping_and_nested_spans_once() -> None:
    spans = [(0.0, 10.0), (2.0, 5.0), (8.0, 12.0), (20.0, 25.0), (25.0, 26.0)]  # microseconds
    assert gpu_throughput.busy_seconds(spans) == pytest.approx(18e-6)
    assert gpu_throughput.busy_seconds([]) == 0.0


def documented_benchmark_lines() -> list[str]:
    """Every `python benchmarks/...` command line docs/performance.md shows: in bash blocks and inline code."""
    text = (ROOT / "docs" / "performance.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.split("#", 1)[0].strip() for line in block.splitlines()]
    lines += re.findall(r"`(python benchmarks/[^`]+)`", text)
    return list(dict.fromkeys(line for line in lines if line.startswith("python benchmarks/")))


def test_the_documented_lines_include_the_core_benchmarks() -> None:
    commands = documented_benchmark_lines()
    assert {"python benchmarks/loop_overhead.py", "python benchmarks/loader_throughput.py",
            "python benchmarks/gpu_throughput.py"} <= set(commands), commands


@pytest.mark.parametrize("command", documented_benchmark_lines())
def test_every_documented_benchmark_line_runs_as_written(command: str, tmp_path: Path) -> None:
    """Each command line of docs/performance.md, exactly as written, from a copy of benchmarks/ and configs/ (their
    JSON goes to benchmarks/results there), with PIPELINE_BENCH_SMOKE=1 capping the sizes. gpu_throughput.py needs
    CUDA: without it, it says so in one line and exits 2."""
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("results"))
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # a checkout's layout: the scripts read configs/
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_BENCH_SMOKE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, *shlex.split(command)[1:]]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if "gpu_throughput" in command and not torch.cuda.is_available():
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert done.stderr.strip().splitlines() == [
            "gpu_throughput: no CUDA device here; run it on a GPU machine (or add --allow-cpu, with tiny sizes, "
            "for a smoke run)"]
        return
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    assert "wrote benchmarks/results/" in done.stdout, command
