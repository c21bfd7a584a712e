"""Freezing strategies, BatchNorm statistics, optimizer param groups, discriminative learning rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config.schema import FinetuneConfig, ModelConfig, OptimConfig
from pipeline.models import create_model
from pipeline.training.freezing import (
    apply_freeze,
    auto_group_prefixes,
    build_groups,
    optimizer_param_groups,
    trainable_groups,
)
from pipeline.training.optim import build_optimizer

torch.set_num_threads(1)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(channels=[4, 8, 8]), num_classes=3, in_channels=1)


def test_automatic_groups():
    assert auto_group_prefixes(small_cnn()) == ["features.0", "features.1", "features.2", "head"]
    resnet = create_model(ModelConfig(name="resnet18"), num_classes=3)
    assert auto_group_prefixes(resnet) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_trainable_sets_per_strategy():
    groups = build_groups(small_cnn())
    names = ["features.0", "features.1", "features.2", "head"]
    assert trainable_groups(FinetuneConfig(), groups, 0) == names
    assert trainable_groups(FinetuneConfig(freeze="feature_extraction"), groups, 7) == ["head"]
    partial = FinetuneConfig(freeze="partial", trainable=["features.2", "head"])
    assert trainable_groups(partial, groups, 0) == ["features.2", "head"]
    gradual = FinetuneConfig(freeze="gradual", unfreeze_every=2)
    assert [trainable_groups(gradual, groups, e) for e in range(8)] == [
        ["head"], ["head"], ["features.2", "head"], ["features.2", "head"], names[1:], names[1:], names, names]
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['layer4'\]; groups: features.0, features.1"):
        trainable_groups(FinetuneConfig(freeze="partial", trainable=["layer4"]), groups, 0)


def test_explicit_groups_cover_everything_and_unknown_names_fail():
    model = small_cnn()
    groups = build_groups(model, ["features.2", "head"])
    assert [g.name for g in groups] == ["features.2", "head"]
    # features.0 and features.1 are not named: they join the first group.
    assert sum(len(g.params) for g in groups) == len(list(model.parameters()))
    assert {n for n, _ in groups[0].params} >= {"features.0.0.0.weight", "features.2.0.0.weight"}
    with pytest.raises(ValueError, match="finetune.groups entry 'layer4' matches no parameter"):
        build_groups(model, ["layer4"])


def test_feature_extraction_gives_only_the_head_to_the_optimizer():
    model = small_cnn()
    cfg = FinetuneConfig(freeze="feature_extraction")
    groups = build_groups(model)
    apply_freeze(model, groups, trainable_groups(cfg, groups, 0), cfg.frozen_bn_eval)
    params = optimizer_param_groups(cfg, groups, 0.1, 0.01, True, model)
    optimizer = build_optimizer(OptimConfig(), model, params)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(model.head[2].weight), id(model.head[2].bias)}
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("head/decay", 0.01),
                                                                                ("head/no_decay", 0.0)]


def test_gradual_keeps_every_group_but_frozen_params_get_no_update_and_no_state():
    model = small_cnn()
    cfg = FinetuneConfig(freeze="gradual")
    groups = build_groups(model)
    apply_freeze(model, groups, trainable_groups(cfg, groups, 0), True)
    optimizer = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1),
                                model, optimizer_param_groups(cfg, groups, 0.01, 0.1, True, model))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    model.train()
    for _ in range(3):
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # weights and BN running stats
    assert {id(p) for p in optimizer.state} == {id(model.head[2].weight), id(model.head[2].bias)}


def test_frozen_batchnorm_stays_in_eval_mode_unless_configured():
    model = small_cnn()
    groups = build_groups(model)
    bn = model.features[0][0][1]
    apply_freeze(model, groups, ["head"], frozen_bn_eval=True)
    model.train()
    before = bn.running_mean.clone()
    model(torch.randn(8, 1, 8, 8))
    assert not bn.training and torch.equal(bn.running_mean, before)
    apply_freeze(model, groups, ["head"], frozen_bn_eval=False)
    model.train()
    model(torch.randn(8, 1, 8, 8))
    assert not torch.equal(bn.running_mean, before)
    apply_freeze(model, groups, ["features.0", "head"], frozen_bn_eval=True)  # unfrozen: trains normally
    model.train()
    model(torch.randn(8, 1, 8, 8))
    assert bn.training


def test_layer_wise_decay_and_multipliers_set_each_group_lr():
    model = small_cnn()
    groups = build_groups(model)
    cfg = FinetuneConfig(layer_decay=0.5, lr_mult={"features.0": 0.0, "features.[12]": 2.0})
    lrs = {g["name"]: g["lr"] for g in optimizer_param_groups(cfg, groups, 0.08, 0.0, True, model)}
    assert lrs == {"features.0/decay": 0.0, "features.0/no_decay": 0.0,
                   "features.1/decay": 0.08 * 0.25 * 2, "features.1/no_decay": 0.08 * 0.25 * 2,
                   "features.2/decay": 0.08 * 0.5 * 2, "features.2/no_decay": 0.08 * 0.5 * 2,
                   "head/decay": 0.08, "head/no_decay": 0.08}


def test_config_checks():
    with pytest.raises(ValueError, match="finetune.freeze=partial needs finetune.trainable"):
        FinetuneConfig(freeze="partial")
    with pytest.raises(ValueError, match="finetune.freeze='thaw' is not valid"):
        FinetuneConfig(freeze="thaw")
    with pytest.raises(ValueError, match=r"finetune.layer_decay=0.0 is out of range"):
        FinetuneConfig(layer_decay=0.0)
