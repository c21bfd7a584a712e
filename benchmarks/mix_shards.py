"""What cross-shard mixing (data.mix_shards) costs and buys: loader throughput, worker memory, batch diversity.

    python benchmarks/mix_shards.py [--images 3000] [--mix 16] [--workers 2] [--repeats 5] [--work DIR] [--no-http]

Throughput: the 3,000-JPEG set of `benchmarks/webdataset_reader.py` (224-280 px, 500 per shard: 6 shards), read as
foreign shards (`data.train=` the files) with RandomResizedCrop(224) + flip + normalise, batch 64, the pipeline's
default workers and start method (2, forkserver), float batches as CPU training gets them; today's reader
(`data.mix_shards=1`) against mixing (`--mix`, default the config's 16), from local files and from Python's
HTTP server on 127.0.0.1, as it is ("http": Python 3.11's ignores Range requests, so a lane that starts inside a
shard downloads and discards the bytes before it) and answering Range requests ("http+range", as nginx, S3 and GCS
do), one epoch per contender, alternating. Memory: each loader worker's peak resident set
(VmHWM) after the epochs, and the open shards it holds. Diversity: mean distinct classes per training batch of 64
on scikit-learn's digits written class-sorted (one class per shard, 10 shards), 1 rank x 2 workers, 3 epochs.
Writes JSON to benchmarks/results/mix_shards.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, alternate, environment, smoke_sizes, table, write_json  # noqa: E402
from benchmarks.loader_throughput import MEAN, STD, Epochs, prepare  # noqa: E402
from benchmarks.webdataset_reader import serve  # noqa: E402


def _config(urls: list[str], args, mix: int, index_dir: Path):
    from pipeline.config import load_config

    quoted = "[" + ",".join(f"'{u}'" for u in urls) + "]"
    return load_config(None, [f"data.train={quoted}", f"data.val={quoted}", f"data.index_dir={index_dir}",
                              f"data.image_size={args.image_size}", "data.channels=3", f"data.mean={MEAN}",
                              f"data.std={STD}", f"data.num_workers={args.workers}", f"data.mix_shards={mix}",
                              "data.augment.random_resized_crop=true", "data.augment.hflip=0.5",
                              f"train.batch_size={args.batch_size}"])


def reader(name: str, urls: list[str], args, mix: int, index_dir: Path) -> tuple[Epochs, object]:
    """One contender: our loader over `urls` at `mix`; (epochs, its SplitLoader)."""
    from pipeline.data import build_loader
    from pipeline.data.dataset.resolve import spec_manifest

    cfg = _config(urls, args, mix, index_dir)
    split = build_loader(cfg, spec_manifest(cfg.data, progress=False), "train", 0, 1, train=True)
    return Epochs(name, lambda: split.loader, (3, args.image_size, args.image_size), split.set_position), split


def worker_memory(split) -> list[dict]:
    """Per loader worker: peak and current resident set (MB) and open .tar files, from /proc."""
    iterator = getattr(split.dataloader, "_iterator", None)
    found = []
    for worker in getattr(iterator, "_workers", []):
        status = dict(line.split(":", 1) for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines()
                      if ":" in line)
        fds = Path(f"/proc/{worker.pid}/fd")
        tars = sum(1 for fd in fds.iterdir() if fd.resolve().name.endswith(".tar")) if fds.is_dir() else 0
        found.append({"peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
                      "rss_mb": int(status["VmRSS"].split()[0]) / 1024, "open_tar_files": tars})
    return found


class LabelCodec:
    """Nothing decoded: only the labels of a batch count here."""

    def decode(self, image, data: bytes, key: str, seed) -> None:
        return None

    def sample(self, source, seed) -> None:
        return None

    def batch(self, items: list) -> None:
        return None


def batch_diversity(work: Path, mixes: list[int]) -> dict[int, float]:
    """Mean distinct classes per full batch of 64 on class-sorted digits shards (1 rank x 2 workers, 3 epochs)."""
    from pipeline.config import load_config
    from pipeline.data import build_stream
    from pipeline.data.dataset.resolve import spec_manifest
    from tests.support.wds_shards import write_class_sorted

    paths = write_class_sorted(work / "class_sorted")
    quoted = {split: "[" + ",".join(f"'{p}'" for p in shards) + "]" for split, shards in paths.items()}
    found = {}
    for mix in mixes:
        cfg = load_config(str(ROOT / "configs" / "default.yaml"),
                          [f"data.train={quoted['train']}", f"data.val={quoted['val']}",
                           f"data.index_dir={work / 'index'}", f"data.mix_shards={mix}"])
        stream = build_stream(cfg, spec_manifest(cfg.data, progress=False), "train", 0, 1, train=True,
                              codec=LabelCodec())
        found[mix] = statistics.mean(distinct_classes(stream))
    return found


def distinct_classes(stream, epochs: int = 3, batch_size: int = 64) -> list[int]:
    """Distinct classes in each full training batch of `batch_size` over `epochs`, every worker of `stream` (labels
    only: the stream's codec should be LabelCodec)."""
    distinct = []
    for epoch in range(epochs):
        stream.set_position(epoch)
        for worker in range(stream.workers):
            distinct += [len(set(labels.tolist())) for _, labels, _ in stream.worker_batches(worker)
                         if len(labels) == batch_size]
    return distinct


def main(argv: list[str] | None = None) -> dict:
    from pipeline.config.schema import DataConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to generate (default 3000)")
    parser.add_argument("--mix", type=int, default=DataConfig().mix_shards, help="data.mix_shards against 1")
    parser.add_argument("--workers", type=int, default=DataConfig().num_workers)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="epochs per contender (default 5)")
    parser.add_argument("--no-http", action="store_true", help="local files only")
    parser.add_argument("--work", default=None, help="folder for the images and shards (kept; default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/mix_shards.json")
    args = smoke_sizes(parser.parse_args(argv), images=200, repeats=1, batch_size=8, image_size=32)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mix_shards_"))
    work.mkdir(parents=True, exist_ok=True)
    servers, splits, memory = {}, {}, {}
    try:
        diversity = batch_diversity(work, [1, args.mix])
        _, shards = prepare(work, args.images, 224)
        local = [str(p) for p in sorted(shards.glob("*.tar"))]
        sources = {"local": local}
        if not args.no_http:
            for where, ranges in (("http", False), ("http+range", True)):
                base, servers[where] = serve(shards, ranges)
                sources[where] = [f"{base}/{Path(p).name}" for p in local]
        contenders = {}
        for where, urls in sources.items():
            for mix in (1, args.mix):
                name = f"mix_shards={mix}, {where}"
                contenders[name], splits[name] = reader(name, urls, args, mix, work / "index")
        print(f"{len(local)} shards, {args.images} JPEGs -> RandomResizedCrop({args.image_size}) + flip + normalise, "
              f"batch {args.batch_size}, {args.workers} worker(s), {args.repeats} epochs each")
        for contender in contenders.values():
            contender.warm_up()
        per_image = alternate(contenders, args.repeats, torch.device("cpu"))
        memory = {name: worker_memory(split) for name, split in splits.items()}
    finally:
        for server in servers.values():
            server.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ratio = {name: statistics.median(b / t for t, b in zip(per_image[name], per_image[f"mix_shards=1, {where}"]))
             for where in sources for name in per_image if name.endswith(where)}
    result = {
        "benchmark": "mix_shards", "images": args.images, "mix_shards": args.mix, "workers": args.workers,
        "batch_size": args.batch_size, "image_size": args.image_size, "repeats": args.repeats,
        "images_per_epoch": {name: c.images for name, c in contenders.items()},
        "images_per_second": {name: statistics.median(1.0 / t for t in times) for name, times in per_image.items()},
        "images_per_second_all": {name: [1.0 / t for t in times] for name, times in per_image.items()},
        "throughput_vs_mix_1": ratio, "worker_memory": memory,
        "distinct_classes_per_batch_of_64": diversity, "environment": environment(),
    }
    rows = [[name, f"{result['images_per_second'][name]:.0f}", f"{ratio[name]:.3f}",
             " / ".join(f"{w['peak_rss_mb']:.0f}" for w in memory.get(name, []))] for name in contenders]
    print(table(["reader", "images/s (median)", "x mix_shards=1 (median of pairs)", "worker peak RSS MB"], rows))
    print("distinct classes per batch of 64, class-sorted digits: "
          + ", ".join(f"mix_shards={mix}: {value:.2f}" for mix, value in diversity.items()))
    print(f"wrote {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
