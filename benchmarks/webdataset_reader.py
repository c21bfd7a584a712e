"""Our reader versus the webdataset library's own pipeline, over the same shards, locally and over HTTP.

    python benchmarks/webdataset_reader.py [--images 3000] [--workers 2] [--batch-size 64] [--image-size 224]
                                           [--repeats 5] [--work DIR] [--no-http]

Writes `--images` colour JPEGs of 224-280 px (made from scikit-learn's digits) as WebDataset shards
(`jpg` + `cls`, 500 per shard), serves the folder with Python's own HTTP server on 127.0.0.1, and
reads one epoch per contender, alternating, with the same work per image (RandomResizedCrop(image_size),
horizontal flip, float, normalise), the same batch size, worker count and start method:

- ours: `data.train=<the shard files>` (the foreign-shards path: indexed once, then streamed), float
  batches as CPU training gets them; from local files and from `http://127.0.0.1:PORT/...`;
- the webdataset library as its users write it: `WebDataset(urls).shuffle(1000).decode(<decode_jpeg>)
  .to_tuple("jpg", "cls").map_tuple(<transforms.v2>, int).batched(B)` in a `WebLoader`; local and
  over HTTP (webdataset opens http:// with curl);
- the same with PIL decoding and the classic torchvision.transforms (`decode("pil")`).

Images/s is images delivered per second of wall time; ratios are medians of per-repeat ratios. Writes
JSON to benchmarks/results/webdataset_reader.json.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, environment, table, write_json  # noqa: E402
from benchmarks.loader_throughput import MEAN, STD, Epochs, prepare  # noqa: E402


def serve(folder: Path, ranges: bool = False) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Python's own HTTP server over `folder` on 127.0.0.1, in a thread; (base URL, server). It ignores Range
    requests (Python 3.11's); `ranges`: answer `Range: bytes=N-` with 206 from byte N, as nginx, S3 and GCS do."""
    handler = functools.partial(RangeHandler if ranges else QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D102 - no line per request
        pass


class RangeHandler(QuietHandler):
    """Python's static server, plus `Range: bytes=N-` answered 206 from byte N (and Accept-Ranges: bytes)."""

    def send_head(self):  # noqa: D102 - SimpleHTTPRequestHandler's hook: headers sent, the body's file returned
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if match is None or not os.path.isfile(path) or int(match.group(1)) >= os.path.getsize(path):
            return super().send_head()
        handle = open(path, "rb")
        info = os.fstat(handle.fileno())
        start = int(match.group(1))
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{info.st_size - 1}/{info.st_size}")
        self.send_header("Content-Length", str(info.st_size - start))
        self.send_header("Last-Modified", self.date_time_string(info.st_mtime))
        self.end_headers()
        return handle

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


def ours(name: str, urls: list[str], args, index_dir: Path) -> Epochs:
    from pipeline.config import load_config
    from pipeline.data import build_loader
    from pipeline.data.dataset.resolve import spec_manifest

    quoted = "[" + ",".join(f"'{u}'" for u in urls) + "]"
    cfg = load_config(None, [f"data.train={quoted}", f"data.val={quoted}", f"data.index_dir={index_dir}",
                             f"data.image_size={args.image_size}", "data.channels=3", f"data.mean={MEAN}",
                             f"data.std={STD}", f"data.num_workers={args.workers}",
                             "data.augment.random_resized_crop=true", "data.augment.hflip=0.5",
                             f"train.batch_size={args.batch_size}"])
    manifest = spec_manifest(cfg.data, progress=False)
    split = build_loader(cfg, manifest, "train", 0, 1, train=True)
    return Epochs(name, lambda: split.loader, (3, args.image_size, args.image_size), split.set_position)


def _decode_jpeg(key: str, data: bytes):
    from torchvision.io import ImageReadMode, decode_jpeg

    if key.lstrip(".") != "jpg":  # webdataset passes the extension with its dot
        return None
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def webdataset(name: str, urls: list[str], args, pil: bool) -> Epochs:
    import webdataset as wds
    from torchvision import transforms as T  # noqa: N812
    from torchvision.transforms import v2

    from pipeline.data.workers import worker_context

    if pil:
        transform = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(MEAN, STD)])
    else:
        transform = v2.Compose([v2.RandomResizedCrop(args.image_size, antialias=True), v2.RandomHorizontalFlip(),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    dataset = (wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker, empty_check=False)
               .shuffle(1000).decode("pil" if pil else _decode_jpeg).to_tuple("jpg", "cls")
               .map_tuple(transform, int).batched(args.batch_size))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0,
                           prefetch_factor=4 if args.workers else None,
                           multiprocessing_context=worker_context(args.worker_start) if args.workers else None)
    return Epochs(name, lambda: loader, (3, args.image_size, args.image_size))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to generate (default 3000)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every contender (default 2)")
    parser.add_argument("--worker-start", default="fork", choices=("forkserver", "fork", "spawn"),
                        help="how every contender's workers start (default fork, as the issue's figures)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="epochs per contender (default 5)")
    parser.add_argument("--no-http", action="store_true", help="local files only")
    parser.add_argument("--work", default=None, help="folder for the images and shards (kept; default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/webdataset_reader.json")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="webdataset_reader_"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        _, shards = prepare(work, args.images, 224)
        local = [str(p) for p in sorted(shards.glob("*.tar"))]
        contenders = {"ours, local": ours("ours local", local, args, work / "index"),
                      "webdataset + decode_jpeg + v2, local": webdataset("wds v2", local, args, pil=False),
                      "webdataset + PIL + classic, local": webdataset("wds pil", local, args, pil=True)}
        if not args.no_http:
            base, server = serve(shards)
            remote = [f"{base}/{Path(p).name}" for p in local]
            contenders["ours, http"] = ours("ours http", remote, args, work / "index")
            contenders["webdataset + decode_jpeg + v2, http"] = webdataset("wds v2 http", remote, args, pil=False)
        print(f"{len(local)} shards, {args.images} JPEGs -> RandomResizedCrop({args.image_size}) + flip + normalise, "
              f"batch {args.batch_size}, {args.workers} worker(s) ({args.worker_start}), {args.repeats} epochs each")
        for contender in contenders.values():
            contender.warm_up()
        per_image = alternate(contenders, args.repeats, torch.device("cpu"))
    finally:
        if server is not None:
            server.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    refs = [name for name in ("webdataset + decode_jpeg + v2, local", "ours, local") if name in per_image]
    result = {
        "benchmark": "webdataset_reader", "images": args.images, "workers": args.workers,
        "worker_start": args.worker_start, "batch_size": args.batch_size, "image_size": args.image_size,
        "repeats": args.repeats, "images_per_epoch": {name: c.images for name, c in contenders.items()},
        "images_per_second": {name: statistics.median(1.0 / t for t in times) for name, times in per_image.items()},
        "speedup_vs": {ref: {name: statistics.median(r / t for t, r in zip(times, per_image[ref]))
                             for name, times in per_image.items()} for ref in refs},
        "environment": environment(),
    }
    rows = [[name, f"{result['images_per_second'][name]:.0f}",
             *(f"{result['speedup_vs'][ref][name]:.2f}" for ref in refs)] for name in contenders]
    print(table(["reader", "images/s (median)", *(f"x {ref}" for ref in refs)], rows))
    print(f"wrote {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
