"""Checks before any heavy work: the data folder, its manifest and shards, pretrained weights, the output folder, the
batch size.

Each failure is one line naming the config key, its value and what would be valid (a ValueError or
FileNotFoundError: the CLI prints it and exits with code 2). The precision check lives with the
device choice in `pipeline.distributed.build_dist`. File-system checks run on the main process and
its verdict is broadcast, so every rank stops alike instead of one rank waiting for the others.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config.schema import Config, DataConfig
from pipeline.data.dataset.manifest import MANIFEST_NAME, Manifest
from pipeline.data.dataset.specs import is_shard_name, is_url
from pipeline.errors import first_line

if TYPE_CHECKING:  # (the module loads without torch: the CLI checks data.root before importing it)
    from pipeline.distributed import Dist


def builds_digits(cfg: Config) -> bool:
    """Whether the digits demo is built at data.root: never for a URL or pattern; by default only at the demo path."""
    root = cfg.data.root
    if any(mark in root for mark in ("://", "pipe:", "{", "*")) or cfg.data.auto_prepare_digits is False:
        return False
    return cfg.data.auto_prepare_digits is True or root == DataConfig().root


def check_data_root(cfg: Config) -> None:
    """data.root exists and holds a manifest (when the digits demo will not be built there)."""
    root = Path(cfg.data.root)
    if (root / MANIFEST_NAME).is_file() or builds_digits(cfg):
        return
    if any(mark in cfg.data.root for mark in ("://", "pipe:", "{", "*")) or is_shard_name(cfg.data.root):
        raise FileNotFoundError(f"data.root='{cfg.data.root}' names shards, not one of our folders; give WebDataset "
                                f"shards as data.train=... data.val=... "
                                f"(see docs/data.md 'WebDataset shards you already have')")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root='{cfg.data.root}' does not exist (the digits demo is built only at "
                                f"{DataConfig().root} or with data.auto_prepare_digits=true); build shards with "
                                f"`pipeline data shards SRC {cfg.data.root}`")
    shards = sorted(p.name for p in root.iterdir() if is_shard_name(p.name))
    if shards:
        raise FileNotFoundError(f"data.root='{root}' has no {MANIFEST_NAME} but {len(shards)} shard file(s) "
                                f"({shards[0]}, ...): name them with data.train=... data.val=... (e.g. "
                                f"data.train='{root}/train-*.tar')")
    raise FileNotFoundError(f"data.root='{root}' has no {MANIFEST_NAME}; build shards there with "
                            f"`pipeline data shards SRC {root}`")


def missing_shards(cfg: Config, manifest: Manifest) -> str:
    root = Path(cfg.data.root)
    names = [s.name for split in manifest.splits.values() for s in split.shards if not is_url(s.name)]
    missing = [name for name in names if not (root / name).is_file()]  # (an absolute name stays as it is)
    if not missing:
        return ""
    return (f"data.root='{root}': {len(missing)} of {len(names)} shard file(s) listed in {MANIFEST_NAME} are "
            f"missing (first: {missing[0]}); rebuild with `pipeline data shards` or check with "
            f"`pipeline data verify {root}`")


def unwritable_output(cfg: Config) -> str:
    """'' if the run folder can be created and written, else the one-line reason."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        return (f"run.output_dir='{cfg.run.output_dir}' is not writable: cannot create '{run_dir}' "
                f"({type(exc).__name__}: {exc.strerror or exc}); choose another run.output_dir")
    return ""


def batch_too_large(cfg: Config, manifest: Manifest, world_size: int) -> str:
    """'' if the training split holds at least one full global batch, else the one-line reason."""
    train = cfg.train
    samples = manifest.split("train").num_samples
    per_step = train.batch_size * world_size * train.grad_accum_steps
    if per_step > samples:
        return (f"train.batch_size={train.batch_size} x {world_size} rank(s) x train.grad_accum_steps="
                f"{train.grad_accum_steps} = {per_step} samples per optimizer step, but data.root='{cfg.data.root}' "
                f"has only {samples} training samples; lower train.batch_size to at most "
                f"{max(1, samples // (world_size * train.grad_accum_steps))}")
    slots = world_size * max(1, cfg.data.num_workers)
    if cfg.data.drop_last and samples // slots < train.batch_size:
        return (f"data.drop_last=true with train.batch_size={train.batch_size} leaves no full batch: each of the "
                f"{slots} rank x worker slot(s) reads {samples // slots} of the {samples} training samples; "
                f"lower train.batch_size or data.num_workers, or set data.drop_last=false")
    return ""


def missing_weights(cfg: Config) -> str:
    """'' if finetune.weights is empty or names a file that exists (not read yet), else the one-line reason."""
    if not cfg.finetune.weights:
        return ""
    from pipeline.models.pretrained import pretrained_weights_file

    try:
        pretrained_weights_file(cfg.finetune.weights, cfg.model.name)
    except (FileNotFoundError, ValueError) as exc:
        return str(exc)
    return ""


def _input_problem(model: Any, channels: int, size: int) -> Exception | None:
    """The error `model` (on the meta device: no memory, no arithmetic) raises for a batch of size x size images."""
    import torch

    try:
        with torch.no_grad():
            model(torch.empty(2, channels, size, size, device="meta"))
    except NotImplementedError:
        return None  # an operation without a meta kernel: nothing can be said here
    except Exception as exc:  # noqa: BLE001 - whatever the model raises for this input size
        return exc
    return None


def image_size_misfit(cfg: Config) -> str:
    """'' if model.name takes data.image_size pixels, else the one-line reason with the smallest size it takes.
    simple_cnn's range is the schema's; a torchvision model is tried on the meta device (shapes only: milliseconds),
    as a 1 px image once ended in a traceback from the first pooling layer, after the data was read."""
    if cfg.model.name == "simple_cnn":
        return ""
    import torch

    from pipeline.config.schema import MAX_IMAGE_SIZE
    from pipeline.models import create_model

    try:
        with torch.device("meta"):
            model = create_model(cfg.model, 2, cfg.data.channels).train()
    except ValueError:
        return ""  # an unknown model name: create_model says so where the model is built
    size, channels = cfg.data.image_size, cfg.data.channels
    problem = _input_problem(model, channels, size)
    if problem is None:
        return ""
    where = f"data.image_size={size} does not fit model.name={cfg.model.name} ({first_line(problem, limit=160)})"
    low, high = size, min(2 * size, MAX_IMAGE_SIZE)  # doubled until it fits: a few probes, not twelve
    while _input_problem(model, channels, high) is not None:
        if high == MAX_IMAGE_SIZE:
            return where  # nothing up to the limit fits, e.g. a ViT takes one size (its message says which)
        low, high = high, min(2 * high, MAX_IMAGE_SIZE)
    while high - low > 1:  # low fails, high fits: the smallest size that fits lies in (low, high]
        middle = (low + high) // 2
        low, high = (middle, high) if _input_problem(model, channels, middle) is not None else (low, middle)
    return f"{where}; it must be >= {high} and <= {MAX_IMAGE_SIZE}"


def preflight(cfg: Config, dist: Dist, manifest: Manifest, run_folder: bool = True) -> None:
    """Raise the first problem found (the same on every rank); create the run folder (the last check, so that a
    failing one leaves no folder behind), unless `run_folder` is false (`pipeline lr-find` writes none)."""
    problem = ""
    if dist.is_main:
        problem = missing_shards(cfg, manifest) or missing_weights(cfg) or image_size_misfit(cfg) \
            or batch_too_large(cfg, manifest, dist.world_size) or (unwritable_output(cfg) if run_folder else "")
    problem = dist.broadcast_object(problem)
    if problem:
        raise ValueError(problem)


__all__ = ["check_data_root", "preflight"]
