"""timm models on a CIFAR-10 subset: train from scratch, then fine-tune from a saved state dict with gradual unfreezing.

    python benchmarks/timm_cifar.py --data ../shared/datasets/cifar10-jpg.tar.gz --cache /tmp/timm_cifar \
        --models resnet18 efficientnet_b0 --epochs 8

1. Shards (in --cache, never in the repository): source = classes 0-4 (airplane ... deer), --source-per-class
   training images each; target = classes 5-9 (dog ... truck), --target-per-class training images each; 50
   validation images per class carved from the training images; as test, --test-per-class official test images.
2. Per model (`timm/<name>`, 32 px, random init, nothing downloaded): train on the source, save its best weights as
   a plain state dict (`<name>_source.safetensors`); on the target, (a) train from scratch, (b) fine-tune from that
   state dict with gradual unfreezing (timm's groups: the head first, one more stage per epoch).
3. Test accuracy and wall time of every run into --out (JSON, with the environment and commit); a markdown table
   printed. `--set KEY=VALUE ...` overrides every run's config last (e.g. `train.precision=fp32 data.num_workers=0`
   on a CPU without bf16 units).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cifar_transfer import CLASSES, cifar10_folder  # noqa: E402
from benchmarks.common import environment, smoke_sizes, write_json  # noqa: E402
from pipeline.data.writer.subsets import write_split_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VAL_PER_CLASS = 50
COMMON = ["data.root={root}", "data.image_size=32", "data.channels=3", "data.num_workers=2",
          "data.augment.crop_padding=4", "data.augment.hflip=0.5", "data.auto_prepare_digits=false",
          "data.mean=[0.4914,0.4822,0.4465]", "data.std=[0.2470,0.2435,0.2616]",
          "optim.name=adamw", "optim.weight_decay=0.05", "optim.label_smoothing=0.1", "scheduler.name=cosine",
          "scheduler.warmup_epochs=1", "train.batch_size=128", "train.precision=bf16", "train.cpu=true",
          "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.resume=never"]


def write_subset(folder: Path, out: Path, classes: list[str], per_class: int, test_per_class: int) -> Path:
    if (out / "manifest.json").is_file():
        return out
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        train = sorted((folder / "train" / name).glob("*.jpg"))[:per_class + VAL_PER_CLASS]
        test = sorted((folder / "test" / name).glob("*.jpg"))[:test_per_class]
        for split, paths in (("train", train[VAL_PER_CLASS:]), ("val", train[:VAL_PER_CLASS]), ("test", test)):
            splits[split] += [({"jpg": p.read_bytes()}, label) for p in paths]
    write_split_shards(out, classes, splits, f"CIFAR-10 {classes[0]}..{classes[-1]}", max_samples=1000)
    return out


def train(root: Path, out: Path, name: str, overrides: list[str]) -> dict:
    started = time.monotonic()
    args = [a.format(root=root) for a in COMMON] + [f"run.output_dir={out}", f"run.name={name}", *overrides]
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", *args, "--json"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}): {result.stderr[-3000:]}")
    metrics = json.loads(result.stdout.strip().splitlines()[-1])["test"]
    return {"accuracy": metrics["accuracy"], "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/timm_cifar"))
    parser.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_b0"])
    parser.add_argument("--source-per-class", type=int, default=1000)
    parser.add_argument("--target-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "timm_cifar.json")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run (they come last)")
    args = smoke_sizes(parser.parse_args(), source_per_class=20, target_per_class=10, test_per_class=10, epochs=1)
    folder = cifar10_folder(args.data, args.cache)
    source = write_subset(folder, args.cache / "source", CLASSES[:5], args.source_per_class, args.test_per_class)
    target = write_subset(folder, args.cache / "target", CLASSES[5:], args.target_per_class, args.test_per_class)
    runs = args.cache / "runs"
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    for model in args.models:
        base = [f"model.name=timm/{model}", f"train.epochs={args.epochs}", f"optim.lr={args.lr}", *args.set]
        results = record["results"][model] = {"source": train(source, runs, f"{model}_source", base)}
        weights = args.cache / f"{model}_source.safetensors"
        shutil.copyfile(runs / f"{model}_source" / "checkpoints" / "best" / "model.safetensors", weights)
        results["target_scratch"] = train(target, runs, f"{model}_scratch", base)
        results["target_gradual"] = train(target, runs, f"{model}_gradual", [
            *base, f"finetune.weights={weights}", "finetune.freeze=gradual", "finetune.unfreeze_every=1",
            "finetune.match_input=false"])
        print(model, json.dumps(results), flush=True)
        write_json({**record, "environment": environment()}, args.out)
    print("| model | source (0-4) | target (5-9) scratch | target fine-tuned, gradual |\n|---|---|---|---|")
    for model, r in record["results"].items():
        print(f"| timm/{model} | {r['source']['accuracy']:.3f} | {r['target_scratch']['accuracy']:.3f} | "
              f"{r['target_gradual']['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
