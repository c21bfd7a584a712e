"""The data manifest a training run uses: of its shard specs (indexed once, by the main process) or of data.root
(the bundled digits shards are written there first when allowed and missing)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.data import Manifest
from pipeline.data.balance import mixing_line, shard_mixing
from pipeline.data.dataset.resolve import spec_manifest, training_shard_labels, uses_specs
from pipeline.data.dataset.specs import describe, expand, other_splits_line
from pipeline.data.writer.shards import ensure_digits_shards
from pipeline.distributed import Dist
from pipeline.run.preflight import builds_digits, check_data_root
from pipeline.tracking.console import warn


def load_manifest(cfg: Config, dist: Dist | None = None) -> Manifest:
    """The data manifest: of the shard specs (data.train ...; indexed by the main process, sent to every rank),
    or of data.root (the bundled digits shards are built first if allowed and missing)."""
    if uses_specs(cfg.data):
        manifest = _spec_manifest(cfg, dist)
        if not cfg.data.test and dist is not None:
            dist.print("data.test is not set: the final evaluation uses the validation shards (data.val)")
    else:
        manifest = _root_manifest(cfg, dist)
    if dist is not None and dist.is_main and uses_specs(cfg.data):
        for split in (s for s in ("train", "val", "test") if getattr(cfg.data, s)):
            clash = other_splits_line(split, expand(getattr(cfg.data, split), f"data.{split}", split).urls)
            if clash:
                warn(clash)
        line = mixing_line(shard_mixing(training_shard_labels(cfg.data, cfg.task)), cfg.data.mix_shards,
                           cfg.train.batch_size)
        if line:
            dist.print(line)
    where = f"data.train='{describe(cfg.data.train)}'" if uses_specs(cfg.data) else f"data.root='{cfg.data.root}'"
    if manifest.num_classes < (1 if cfg.task.type == "regression" else 2):
        raise ValueError(f"{where}: its {'shards have' if uses_specs(cfg.data) else 'manifest has'} "
                         f"{manifest.num_classes} class(es) ({', '.join(manifest.classes) or 'none'}); "
                         f"a classifier needs at least 2")
    return manifest


def _spec_manifest(cfg: Config, dist: Dist | None) -> Manifest:
    """Expanded and indexed once, by the main process; every rank gets the same manifest (or the same error)."""
    def build() -> Manifest:
        return spec_manifest(cfg.data, progress=cfg.logging.progress, warn_shared=dist is not None, task=cfg.task)

    return build() if dist is None else dist.on_main(build)


def _root_manifest(cfg: Config, dist: Dist | None) -> Manifest:
    root = Path(cfg.data.root)
    check_data_root(cfg)
    if not (root / "manifest.json").is_file() and builds_digits(cfg):
        if dist is None:
            return ensure_digits_shards(root)
        with dist.main_process_first():
            if dist.is_main:
                dist.print(f"no shards at {root}: writing scikit-learn's digits there")
                ensure_digits_shards(root)
    manifest = Manifest.read(root, offsets=True)
    for split in ("train", "val", "test"):
        if split not in manifest.splits:
            raise ValueError(f"manifest in '{root}' has no '{split}' split")
    _check_label_form(cfg, manifest)
    for shared in manifest.shared_with_train() if dist is not None else ():
        dist.warn(shared.line(f"data.root '{root}' {shared.split}", "its train split"))
    return manifest


def _check_label_form(cfg: Config, manifest: Manifest) -> None:
    """Shards written with label sets or numbers (the manifest's task) train only as what they hold: one line naming
    the task.type and data.label_key to give. (Single-label shards may also train as multilabel, as before.)"""
    if manifest.task == "classification" or (cfg.task.type, cfg.data.label_key) == (manifest.task, manifest.label_key):
        return
    raise ValueError(f"data.root='{cfg.data.root}' holds {manifest.task} labels under '{manifest.label_key}'; train "
                     f"with task.type={manifest.task} data.label_key={manifest.label_key} (given: task.type="
                     f"{cfg.task.type} data.label_key={cfg.data.label_key})")


__all__ = ["load_manifest"]
