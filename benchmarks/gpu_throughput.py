"""GPU training throughput: ResNet-50/18 at 224 px, bf16, channels_last, with and without torch.compile.

    python benchmarks/gpu_throughput.py [--models resnet50 resnet18] [--compile off on]
                                        [--sources synthetic shards-gpu-decode shards-cpu-decode]
                                        [--batch-size 256] [--image-size 224] [--steps 30] [--repeats 3]

First measures the GPU's bf16 matmul rate (an 8192^3 GEMM), then for every model x compile x source
builds the pipeline's real run (`build_run`: Accelerate, the Trainer, the configured loader) and
times `Trainer.train_epoch`:

- synthetic: the same in-memory batches on the GPU, `--steps` per timed block (no input pipeline);
- shards-gpu-decode: colour JPEGs (224-280 px, made from the digits) in our shards, read with
  `data.decode_device=cuda`: workers read bytes, nvJPEG decodes the batch, crop/flip/normalise on the GPU;
- shards-cpu-decode: the same shards decoded and augmented by `--workers` CPU workers (uint8 batches,
  normalised on the GPU).

Reports images/s, step time, peak GPU memory, training FLOPs per image (forward + backward, counted
by torch.utils.flop_counter.FlopCounterMode on the meta device) and MFU = FLOPs/s over the measured
matmul rate. With --profile, one more block per configuration runs under torch.profiler: the top
operators go to a table next to the JSON, and the JSON gets the fraction of the wall time the GPU was
busy (the union of its kernels and copies) and the main process's CPU time: where the time goes when a
target is missed. Without CUDA it refuses, unless --allow-cpu (a smoke run at tiny sizes: ImageNet
figures need a GPU). Writes JSON to benchmarks/results/gpu_throughput.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, sync, table, write_json  # noqa: E402
from benchmarks.loop_overhead import PipelineLoop, make_batches  # noqa: E402

SOURCES = ("synthetic", "shards-gpu-decode", "shards-cpu-decode")


def matmul_tflops(device: torch.device, size: int, iterations: int) -> float:
    """Measured dense bf16 matmul rate (TFLOP/s): the ceiling MFU is reported against."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(iterations):
        a @ b
    sync(device)
    return 2 * size**3 * iterations / (time.perf_counter() - started) / 1e12


def training_flops_per_image(cfg, num_classes: int) -> float:
    """Forward + backward FLOPs of one training image, counted on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import create_model

    model = create_model(cfg.model, num_classes, cfg.data.channels).to("meta")
    images = torch.empty(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(images).float().sum().backward()
    return counter.get_total_flops() / 2


def jpeg_strokes() -> tuple | None:
    """None (scikit-learn's digits) where scikit-learn is installed; else, as on a GPU machine's bare Python,
    1,797 random 8x8 strokes in 10 classes: JPEGs of the same sizes and statistics, for a throughput benchmark."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)
        print("scikit-learn is not installed: the JPEGs are drawn from random 8x8 strokes instead of the digits")
        return rng.integers(0, 17, size=(1797, 8, 8)).astype(np.float64), np.arange(1797) % 10
    return None


def make_shards(work: Path, images: int, source_size: int) -> Path:
    from pipeline.data.writer.digits import write_digits_jpeg_imagefolder
    from pipeline.data.writer.shards import write_shards

    shards = work / f"shards-{images}"
    if not (shards / "manifest.json").is_file():
        started = time.perf_counter()
        folder = work / f"jpegs-{images}"
        write_digits_jpeg_imagefolder(folder, images, size=source_size, strokes=jpeg_strokes())
        write_shards(folder, shards, fractions=(1.0, 0.0, 0.0), max_samples=512, show_progress=False)
        print(f"wrote {images} JPEG shards in {time.perf_counter() - started:.0f}s")
    return shards


def overrides_for(args, model: str, compiled: bool, source: str, work: Path, shards: Path) -> list[str]:
    decode = {"synthetic": "workers", "shards-gpu-decode": "cuda", "shards-cpu-decode": "workers"}[source]
    if decode == "cuda" and args.allow_cpu and not torch.cuda.is_available():
        decode = "cpu"  # the smoke run exercises the same main-process decode path on the CPU
    return [f"model.name={model}", f"model.compile={str(compiled).lower()}", "model.channels_last=true",
            f"data.root={shards}", f"data.image_size={args.image_size}", "data.channels=3",
            "data.augment.random_resized_crop=true", "data.augment.hflip=0.5", f"data.decode_device={decode}",
            f"data.num_workers={args.workers}", "data.shuffle_buffer=256", "data.drop_last=true",
            f"train.batch_size={args.batch_size}",
            "train.precision=bf16", "optim.name=sgd", "optim.lr=0.1", "optim.nesterov=true",
            "optim.weight_decay=5e-5", "scheduler.name=cosine", "logging.wandb_mode=disabled",
            "logging.progress=false", f"logging.training_signals={str(args.signals).lower()}",
            "train.epochs=1000", f"run.output_dir={work}/runs", f"run.name={model}-{compiled}-{source}",
            f"train.log_every_steps={args.steps}", *args.overrides]


def measure(args, model: str, compiled: bool, source: str, work: Path, shards: Path) -> dict:
    from pipeline.config import load_config

    cfg = load_config(None, overrides_for(args, model, compiled, source, work, shards))
    loop = PipelineLoop(cfg)
    device = loop.device
    if source == "synthetic":
        loop.use(make_batches(cfg, args.steps, device))
    # else: the run's own loader over the shards; one block = one epoch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):  # compilation, cuDNN autotuning, allocator, workers starting
        loop.block()
    seconds, images = [], []
    for _ in range(args.repeats):
        sync(device)
        started = time.perf_counter()
        steps = loop.block()
        sync(device)
        seconds.append(time.perf_counter() - started)
        images.append(steps * cfg.train.batch_size if source == "synthetic"
                      else loop.trainer.train_data.stream.samples_per_epoch())
    table = Path(args.out).with_name(
        f"{Path(args.out).stem}_{model}_{'compiled' if compiled else 'eager'}_{source}_profile.txt")
    profiled = profile_block(loop, device, table) if args.profile else None
    loop.trainer.stop.uninstall()
    rates = [n / s for n, s in zip(images, seconds)]
    result = {"model": model, "compile": compiled, "source": source, "decode_device": cfg.data.decode_device,
              "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size,
              "images_per_second": statistics.median(rates), "images_per_second_all": rates,
              "images_per_block": images, "step_ms": cfg.train.batch_size / statistics.median(rates) * 1e3,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "flops_per_image": training_flops_per_image(cfg, loop.run.manifest.num_classes)}
    if profiled is not None:
        result["profile"] = profiled
    del loop
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile_block(loop, device: torch.device, path: Path) -> dict:
    """One more block under torch.profiler: where the time goes. Writes the top operators by device time (by
    CPU time without CUDA) to `path`; returns the wall time, the time the device was busy (the union of its
    kernels and copies; without CUDA, of the main process's torch operators) and the main process's CPU time,
    so an input- or launch-bound run shows as a busy fraction well below 1."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    cpu_started, started = time.process_time(), time.perf_counter()
    with profile(activities=activities) as prof:
        loop.block()
        sync(device)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    busy = busy_seconds([(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == kind])
    return {"wall_s": wall, "busy_s": busy, "busy_fraction": busy / wall, "busy_device": device.type,
            "main_process_cpu_s": cpu, "table": path.name}


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans in microseconds, in seconds (overlaps and nesting once)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="synthetic: steps per timed block (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks first (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks (default 3)")
    parser.add_argument("--shard-images", type=int, default=8192, help="JPEGs in the shards (one block = one epoch)")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--no-signals", dest="signals", action="store_false",
                        help="logging.training_signals=false (per-step gradient norms off)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more block per configuration (tables next to the JSON; GPU busy fraction)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (smoke test; use tiny sizes)")
    parser.add_argument("--work", default=None, help="folder for shards and run folders (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/gpu_throughput.json")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_throughput: no CUDA device here; run it on a GPU machine (or add --allow-cpu, with tiny sizes, "
              "for a smoke run)", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "gpu_throughput", "device": torch.cuda.get_device_name(0) if device.type == "cuda"
              else "cpu", "environment": environment(), "runs": []}
    try:
        result["bf16_matmul_tflops"] = matmul_tflops(device, args.matmul_size, 50 if device.type == "cuda" else 3)
        print(f"bf16 matmul {args.matmul_size}^3: {result['bf16_matmul_tflops']:.1f} TFLOP/s")
        # Synthetic data needs only a manifest (the classes): a small set is enough.
        shards = make_shards(work, args.shard_images if set(args.sources) != {"synthetic"} else 64, args.image_size)
        for model in args.models:
            for compiled in (c == "on" for c in args.compile):
                for source in args.sources:
                    run = measure(args, model, compiled, source, work, shards)
                    run["mfu"] = run["flops_per_image"] * run["images_per_second"] / (
                        result["bf16_matmul_tflops"] * 1e12)
                    result["runs"].append(run)
                    busy = run.get("profile", {}).get("busy_fraction")
                    print(f"{model} compile={compiled} {source}: {run['images_per_second']:.0f} img/s, "
                          f"MFU {run['mfu']:.1%}" + (f", {device.type} busy {busy:.0%} of the time" if busy else ""),
                          flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = [[r["model"], "on" if r["compile"] else "off", r["source"], f"{r['images_per_second']:.0f}",
             f"{r['step_ms']:.1f}", "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
             f"{r['flops_per_image'] / 1e9:.2f}", f"{r['mfu']:.1%}"] for r in result["runs"]]
    print(table(["model", "compile", "input", "images/s", "step ms", "peak GiB", "GFLOP/image", "MFU"], rows))
    print(f"wrote {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
