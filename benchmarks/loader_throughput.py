"""Loader throughput: our shard loader versus torchvision ImageFolder + DataLoader over the same JPEGs.

    python benchmarks/loader_throughput.py [--images 5000] [--workers 2] [--batch-size 64] [--image-size 224]
                                           [--source-size 224] [--repeats 5] [--work DIR]

Writes `--images` colour JPEGs made from scikit-learn's digits (each side drawn from
[source-size, 1.25 x source-size], ~35 kB at 224 px) as an ImageFolder tree, and the very same files
as our shards (`write_shards`, one training split, bytes copied unchanged). Then reads one epoch per
contender, alternating, with the same transforms (RandomResizedCrop(image_size), horizontal flip,
float + normalise), batch size, worker count, prefetching and persistent workers:

- ImageFolder + the classic torchvision.transforms (PIL crop/resize, ToTensor, Normalize);
- ImageFolder + our own transforms.v2 pipeline (`build_transform`, the fairer baseline);
- our shard loader as training uses it on a CPU (decode + augment in the workers, uint8 batches,
  normalised in the main process into recycled memory), with and without decoding at reduced size
  (`data.jpeg_draft`);
- the same normalising in the workers (float batches through shared memory: the loader before);
- the workers' uint8 batches as training on a GPU receives them (normalised on the GPU, so not timed
  here: a like-for-like figure only for GPU training);
- with --main-process-decode, `data.decode_device=cpu` (workers read bytes; the main process decodes).

Images/s is images delivered per second of wall time; the ratio is the median over repeats of the
per-repeat ratio. Writes JSON to benchmarks/results/loader_throughput.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, environment, smoke_sizes, table, write_json  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def prepare(work: Path, images: int, source_size: int) -> tuple[Path, Path]:
    """The JPEG ImageFolder and its shards (reused when `work` already holds the same set)."""
    from pipeline.data.writer.digits import write_digits_jpeg_imagefolder
    from pipeline.data.writer.shards import write_shards

    folder, shards = work / "imagefolder", work / "shards"
    stamp = work / "made.txt"
    wanted = f"{images} {source_size}\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder, shards
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    started = time.perf_counter()
    write_digits_jpeg_imagefolder(folder, images, size=source_size)
    write_shards(folder, shards, fractions=(1.0, 0.0, 0.0), max_samples=500, show_progress=False)
    stamp.write_text(wanted)
    print(f"wrote {images} JPEGs and their shards to {work} in {time.perf_counter() - started:.0f}s")
    return folder, shards


def _loader_kwargs(args) -> dict:
    from pipeline.data.workers import worker_context

    workers = args.workers
    return {"num_workers": workers, "persistent_workers": workers > 0, "prefetch_factor": 4 if workers else None,
            "multiprocessing_context": worker_context(args.worker_start) if workers else None}


def imagefolder_loader(folder: Path, args, transform) -> torch.utils.data.DataLoader:
    from torchvision import datasets

    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform), batch_size=args.batch_size,
                                       shuffle=True, generator=torch.Generator().manual_seed(0),
                                       **_loader_kwargs(args))


def classic_transform(size: int):
    from torchvision import transforms as T  # noqa: N812

    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def shard_config(shards: Path, args, *overrides: str):
    from pipeline.config import load_config

    return load_config(None, [f"data.root={shards}", f"data.image_size={args.image_size}", "data.channels=3",
                              f"data.worker_start={args.worker_start}",
                              f"data.mean={MEAN}", f"data.std={STD}", f"data.num_workers={args.workers}",
                              "data.augment.random_resized_crop=true", "data.augment.hflip=0.5",
                              f"train.batch_size={args.batch_size}", *overrides])


class Epochs:
    """One call = one epoch of a loader; returns the images it delivered (and checks the first batch)."""

    def __init__(self, name: str, batches, shape: tuple, set_epoch=None, dtype: torch.dtype = torch.float32):
        """`batches()` gives a new iterator over one epoch's (images, labels)."""
        self.name, self.batches, self.shape, self.set_epoch, self.dtype = name, batches, shape, set_epoch, dtype
        self.epoch = 0
        self.images: list[int] = []

    def warm_up(self) -> None:
        """Start the (persistent) workers and read one batch, so the first timed epoch is not the first."""
        if self.set_epoch is not None:
            self.set_epoch(0)
        next(iter(self.batches()))

    def __call__(self) -> int:
        if self.set_epoch is not None:
            self.set_epoch(self.epoch)
        self.epoch += 1
        count = 0
        for index, (images, labels) in enumerate(self.batches()):
            if index == 0 and (tuple(images.shape[1:]) != self.shape or images.dtype != self.dtype):
                raise AssertionError(f"{self.name}: batch {tuple(images.shape)} {images.dtype}, expected "
                                     f"(N, {', '.join(map(str, self.shape))}) {self.dtype}")
            count += len(labels)
        self.images.append(count)
        return count


def _raw_contender(name: str, shards: Path, manifest, args, normalize, dtype: torch.dtype) -> Epochs:
    """Our shard stream's batches exactly as the workers send them (no main-process step)."""
    from pipeline.data import SplitLoader, build_stream
    from pipeline.data.samples.decode import WorkerDecode
    from pipeline.data.samples.transforms import SampleAugment
    from pipeline.data.stream import make_loader

    cfg = shard_config(shards, args, "data.jpeg_draft=true")
    codec = WorkerDecode(SampleAugment(cfg.data, train=True), 3, normalize, draft=True)
    stream = build_stream(cfg, manifest, "train", 0, 1, train=True, codec=codec)
    split = SplitLoader(stream, make_loader(stream, args.workers, pin_memory=False, start_method=args.worker_start))
    return Epochs(name, lambda: split.loader, (3, args.image_size, args.image_size), stream.set_position, dtype)


def build_contenders(folder: Path, shards: Path, args) -> dict[str, Epochs]:
    from pipeline.data import Manifest, build_loader
    from pipeline.data.samples.transforms import BatchNormalize, build_transform

    shape = (3, args.image_size, args.image_size)
    manifest = Manifest.read(shards)
    classic = imagefolder_loader(folder, args, classic_transform(args.image_size))
    v2 = imagefolder_loader(folder, args, build_transform(shard_config(shards, args).data, train=True))
    contenders = {
        "ImageFolder + transforms (classic)": Epochs("classic", lambda: classic, shape),
        "ImageFolder + transforms.v2 (ours)": Epochs("v2", lambda: v2, shape),
    }
    variants = {"shards": ["data.jpeg_draft=false"], "shards + draft": ["data.jpeg_draft=true"]}
    if args.main_process_decode:
        variants["shards, decode_device=cpu"] = ["data.decode_device=cpu", "data.jpeg_draft=false"]
    for name, overrides in variants.items():
        split = build_loader(shard_config(shards, args, *overrides), manifest, "train", 0, 1, train=True)
        contenders[name] = Epochs(name, lambda split=split: split.loader, shape, split.set_position)
    # Normalising in the workers, as the loader did before: float batches through shared memory.
    contenders["shards, float batches from the workers"] = _raw_contender(
        "float", shards, manifest, args, BatchNormalize(shard_config(shards, args).data), torch.float32)
    # What the workers send when training on a GPU: uint8 batches, normalised there (not timed here).
    contenders["shards + draft, uint8 out (GPU mode)"] = _raw_contender("uint8", shards, manifest, args, None,
                                                                        torch.uint8)
    return contenders


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="JPEGs to generate (default 5000)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every contender (default 2)")
    parser.add_argument("--worker-start", default="forkserver", choices=("forkserver", "fork", "spawn"),
                        help="how every contender's workers start (default forkserver, the pipeline's default)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="RandomResizedCrop output side (default 224)")
    parser.add_argument("--source-size", type=int, default=224, help="smallest JPEG side (default 224)")
    parser.add_argument("--repeats", type=int, default=5, help="epochs per contender (default 5)")
    parser.add_argument("--main-process-decode", action="store_true",
                        help="add the decode_device=cpu contender (slow on a CPU: one process decodes)")
    parser.add_argument("--work", default=None, help="folder for the images and shards (kept; default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    args = smoke_sizes(parser.parse_args(argv), images=48, repeats=1, batch_size=8, image_size=32, source_size=32)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loader_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        folder, shards = prepare(work, args.images, args.source_size)
        contenders = build_contenders(folder, shards, args)
        print(f"{args.images} JPEGs ({args.source_size}-{int(args.source_size * 1.25)} px) -> "
              f"RandomResizedCrop({args.image_size}) + flip + normalise, batch {args.batch_size}, "
              f"{args.workers} worker(s) ({args.worker_start}), {args.repeats} epochs each")
        for contender in contenders.values():
            contender.warm_up()
        per_image = alternate(contenders, args.repeats, torch.device("cpu"))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    baseline = "ImageFolder + transforms.v2 (ours)"
    classic = "ImageFolder + transforms (classic)"
    result = {
        "benchmark": "loader_throughput", "images_generated": args.images, "workers": args.workers,
        "worker_start": args.worker_start,
        "batch_size": args.batch_size, "image_size": args.image_size,
        "source_sides": [args.source_size, int(args.source_size * 1.25)], "repeats": args.repeats,
        "images_per_epoch": {name: c.images for name, c in contenders.items()},
        "images_per_second": {name: statistics.median(1.0 / t for t in times) for name, times in per_image.items()},
        "images_per_second_all": {name: [1.0 / t for t in times] for name, times in per_image.items()},
        "speedup_vs": {
            ref: {name: statistics.median(r / t for t, r in zip(times, per_image[ref]))
                  for name, times in per_image.items()} for ref in (classic, baseline)},
        "environment": environment(),
    }
    rows = [[name, f"{result['images_per_second'][name]:.0f}", f"{result['speedup_vs'][classic][name]:.2f}",
             f"{result['speedup_vs'][baseline][name]:.2f}"] for name in contenders]
    print(table(["loader", "images/s (median)", "x classic ImageFolder", "x ImageFolder + v2"], rows))
    print(f"wrote {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
