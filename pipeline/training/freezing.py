"""Freezing strategies, discriminative learning rates and gradual unfreezing.

A model is cut into *groups*: module-name prefixes ordered from input to output, the head last (a timm model:
the stages its own coarse `group_matcher` names, stem ... head, as timm's layer decay cuts it).
A strategy decides which groups train:

- `full`: all; `feature_extraction`: the head only; `partial`: the groups named in `trainable`;
- `gradual`: the head for the first `unfreeze_every` epochs, then one more group (the nearest to
  the head) every `unfreeze_every` epochs. The trainable set is a pure function of the epoch, so a
  resumed run recomputes exactly the same set.

Frozen parameters get `requires_grad=False`. For the fixed strategies they are left out of the
optimizer altogether. For `gradual` every group is in the optimizer from the start, so the param
groups never change (and a checkpoint's optimizer state always fits); a frozen parameter has no
gradient, so the optimizer neither updates it nor allocates state for it. Frozen BatchNorm layers
are held in eval mode by a forward pre-hook, so the loop's `model.train()` cannot make them update
their running statistics.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from pipeline.config.schema import FinetuneConfig
from pipeline.models.timm_models import is_timm_model, timm_layer_groups
from pipeline.training.callbacks import Callback
from pipeline.training.optim import NORM_TYPES


@dataclass
class Group:
    """Parameters of one module group."""

    name: str
    params: list[tuple[str, nn.Parameter]]


def auto_group_prefixes(model: nn.Module) -> list[str]:
    """Top-level children that hold parameters, with a `features` Sequential split into its blocks."""
    prefixes = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name == "features" and isinstance(child, nn.Sequential) and len(child) > 1:
            prefixes += [f"{name}.{sub}" for sub, block in child.named_children()
                         if any(True for _ in block.parameters())]
        else:
            prefixes.append(name)
    return prefixes


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def timm_groups(model: nn.Module) -> list[Group] | None:
    """The groups timm's own coarse group_matcher cuts a timm model into (named stem, layer1, blocks.3, head ...);
    None for other models."""
    named = timm_layer_groups(model) if is_timm_model(model) else None
    if named is None:
        return None
    params = dict(model.named_parameters())
    return [Group(name, [(n, params[n]) for n in names]) for name, names in named]


def build_groups(model: nn.Module, prefixes: list[str] | None = None) -> list[Group]:
    """Every parameter in exactly one group (the first prefix that covers it; uncovered ones join the first).
    Without prefixes: timm's groups for a timm model, else `auto_group_prefixes`."""
    if not prefixes:
        groups = timm_groups(model)
        if groups is not None:
            return groups
    prefixes = list(prefixes or []) or auto_group_prefixes(model)
    groups = [Group(p, []) for p in prefixes]
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(n, prefix) for n in names):
            raise ValueError(f"finetune.groups entry '{prefix}' matches no parameter; module groups of this "
                             f"model: {', '.join(auto_group_prefixes(model))}")
    for name, param in model.named_parameters():
        owner = next((g for g in groups if _under(name, g.name)), groups[0])
        owner.params.append((name, param))
    return groups


def trainable_groups(cfg: FinetuneConfig, groups: list[Group], epoch: int) -> list[str]:
    """Names of the groups that train during `epoch` (0-based)."""
    names = [g.name for g in groups]
    if cfg.freeze == "full":
        return names
    if cfg.freeze == "feature_extraction":
        return names[-1:]
    if cfg.freeze == "partial":
        unknown = [t for t in cfg.trainable if t not in names]
        if unknown:
            raise ValueError(f"finetune.trainable has unknown group(s) {unknown}; groups: {', '.join(names)}")
        return [n for n in names if n in cfg.trainable]
    count = min(len(names), 1 + epoch // cfg.unfreeze_every)
    return names[len(names) - count:]


def _hold_eval(module: nn.Module, args) -> None:
    if getattr(module, "_frozen_stats", False):
        module.training = False


def apply_freeze(model: nn.Module, groups: list[Group], trainable: list[str], frozen_bn_eval: bool) -> None:
    """Set requires_grad per group and pin frozen BatchNorm layers to eval mode."""
    for group in groups:
        for _, param in group.params:
            param.requires_grad_(group.name in trainable)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            frozen = frozen_bn_eval and bool(params) and not any(p.requires_grad for p in params)
            if not hasattr(module, "_frozen_stats"):
                module.register_forward_pre_hook(_hold_eval)
            module._frozen_stats = frozen


def _lr_scale(cfg: FinetuneConfig, index: int, num_groups: int, name: str) -> float:
    scale = cfg.layer_decay ** (num_groups - 1 - index)
    for pattern, mult in cfg.lr_mult.items():
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return scale * mult
    return scale


def optimizer_param_groups(cfg: FinetuneConfig, groups: list[Group], base_lr: float, weight_decay: float,
                           exclude_norm_and_bias: bool, model: nn.Module) -> list[dict]:
    """One optimizer param group per (module group, decay / no decay), each with its own lr.

    Frozen parameters are left out unless the strategy is gradual (see the module docstring).
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    out = []
    for index, group in enumerate(groups):
        scale = _lr_scale(cfg, index, len(groups), group.name)
        decay, no_decay = [], []
        for name, param in group.params:
            if not param.requires_grad and cfg.freeze != "gradual":
                continue
            exempt = exclude_norm_and_bias and (id(param) in norm_params or name.endswith(".bias") or param.ndim <= 1)
            (no_decay if exempt else decay).append(param)
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                out.append({"params": params, "weight_decay": wd, "lr": base_lr * scale, "lr_scale": scale,
                            "name": f"{group.name}/{suffix}"})
    return out


class FreezeCallback(Callback):
    """Applies the trainable set of each epoch, logs per-group lr, saves the freeze state in checkpoints."""

    name = "freeze"

    def __init__(self, cfg: FinetuneConfig, model: nn.Module, groups: list[Group]):
        self.cfg, self.model, self.groups = cfg, model, groups
        self.trainable: list[str] = [g.name for g in groups]

    def set_epoch(self, epoch: int) -> list[str]:
        self.trainable = trainable_groups(self.cfg, self.groups, epoch)
        apply_freeze(self.model, self.groups, self.trainable, self.cfg.frozen_bn_eval)
        return self.trainable

    def on_fit_start(self, trainer) -> None:
        # After a resume trainer.state.epoch is the epoch to continue, so this is the set it trained with.
        self.set_epoch(trainer.state.epoch)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self.cfg.freeze == "gradual":
            before = self.trainable
            if self.set_epoch(epoch) != before:
                trainer.dist.print(f"gradual unfreezing: epoch {epoch + 1} trains {', '.join(self.trainable)}")

    def on_epoch_end(self, trainer, record: dict) -> None:
        for group in trainer.optimizer.param_groups:
            record[f"lr/{group.get('name', '?')}"] = group["lr"]
        record["trainable_params"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_dict(self) -> dict:
        return {"trainable": list(self.trainable), "strategy": self.cfg.freeze}

    def load_state_dict(self, state: dict) -> None:
        if state.get("strategy", self.cfg.freeze) != self.cfg.freeze:
            raise ValueError(f"the checkpoint was trained with finetune.freeze={state['strategy']}, the config "
                             f"says {self.cfg.freeze}; resume with the same strategy or start a new run")
        self.trainable = list(state.get("trainable", self.trainable))
        apply_freeze(self.model, self.groups, self.trainable, self.cfg.frozen_bn_eval)
