"""Fine-tuning setup for `build_run`: input matching, pretrained weights, freezing, param groups, loss weights."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pipeline.config.schema import Config
from pipeline.models.pretrained import (
    LoadReport,
    hub_pretrained_cfg,
    is_run_folder,
    is_torchvision_weights_name,
    load_pretrained,
    pretrained_input,
    read_pretrained_state,
)
from pipeline.models.timm_models import input_of_pretrained_cfg, is_timm_name, timm_pretrained_input
from pipeline.run_folder import RunFolder
from pipeline.training.callbacks import Callback
from pipeline.training.freezing import FreezeCallback, apply_freeze, build_groups, optimizer_param_groups


def pretrained_preprocessing(cfg: Config) -> dict | None:
    """The input the pretrained weights expect (image_size, mean, std, crop_pct for timm), or None: a torchvision
    weights name's own transforms; for a timm model, the hub config.json beside the weights, else timm's
    pretrained config of model.name. Weights from a run folder of ours keep the config's data settings."""
    weights = cfg.finetune.weights
    if is_torchvision_weights_name(weights):
        return pretrained_input(weights)
    if is_timm_name(cfg.model.name) and not is_run_folder(weights):
        hub = hub_pretrained_cfg(weights)
        return input_of_pretrained_cfg(hub) if hub else timm_pretrained_input(cfg.model.name)
    return None


def match_input(cfg: Config) -> Config:
    """With pretrained weights (and finetune.match_input), use their input size, normalisation (and timm's crop)."""
    if not (cfg.finetune.weights and cfg.finetune.match_input):
        return cfg
    expected = pretrained_preprocessing(cfg)
    if expected is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.image_size = expected["image_size"]
    if "crop_pct" in expected:
        cfg.data.eval_crop_pct = expected["crop_pct"]
    if cfg.data.channels == 1:  # gray input through RGB-trained filters: one channel, the average statistics
        cfg.data.mean = [sum(expected["mean"]) / 3]
        cfg.data.std = [sum(expected["std"]) / 3]
    else:
        cfg.data.mean, cfg.data.std = expected["mean"], expected["std"]
    return cfg


def uses_finetuning(cfg: Config) -> bool:
    f = cfg.finetune
    return bool(f.weights) or f.freeze != "full" or bool(f.lr_mult) or f.layer_decay != 1.0 or bool(f.groups)


@dataclass
class Finetune:
    """What `build_run` needs: optimizer param groups (None: the default ones) and callbacks."""

    param_groups: list[dict] | None = None
    callbacks: list[Callback] = field(default_factory=list)
    report: LoadReport | None = None


def build_finetune(cfg: Config, model: nn.Module, run_dir: Path | None = None, printer=print,
                   is_main: bool = True) -> Finetune:
    """Load pretrained weights into `model`, freeze it per the config, and build its param groups."""
    if not uses_finetuning(cfg):
        return Finetune()
    f = cfg.finetune
    report = None
    if f.weights:
        state = read_pretrained_state(f.weights, cfg.model.name)
        report = load_pretrained(model, state, f.weights, load_head=f.load_head)
        if not report.loaded:
            raise ValueError(f"finetune.weights={f.weights!r}: no tensor fits model.name={cfg.model.name!r} "
                             f"(first keys in file: {', '.join(list(state)[:3])})")
        for line in report.lines():
            printer(line)
        if is_main and run_dir is not None:
            RunFolder(run_dir).pretrained_load.write_text(json.dumps(report.__dict__, indent=1) + "\n")
    groups = build_groups(model, f.groups)
    callback = FreezeCallback(f, model, groups)
    callback.set_epoch(0)  # the fixed strategies need the frozen set before the optimizer is built
    params = optimizer_param_groups(f, groups, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.exclude_norm_and_bias,
                                    model)
    if not params:
        apply_freeze(model, groups, [g.name for g in groups], f.frozen_bn_eval)
        raise ValueError("the freezing strategy leaves no trainable parameter")
    return Finetune(params, [callback], report)
