"""timm's model zoo: `model.name=timm/<name>` through `timm.create_model`, its layer groups and pretrained config.

timm is imported here only, and only when a timm model is built: importing it takes seconds, which config checks
and `pipeline --help` must not pay. Nothing is downloaded: models are built with `pretrained=False` and pretrained
weights come through `finetune.weights` (pipeline.models.pretrained).
"""

from __future__ import annotations

import re

from torch import nn

TIMM_PREFIX = "timm/"


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def timm_arch(name: str) -> str:
    """`timm/resnet50.a1_in1k` -> `resnet50.a1_in1k` (a pretrained tag after the dot is allowed)."""
    return name[len(TIMM_PREFIX):]


def check_timm_name(name: str) -> str:
    """The timm model name of `model.name`, or one line with the closest names timm knows."""
    import difflib

    import timm

    arch = timm_arch(name)
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else "see timm.list_models()"
    raise ValueError(f"model.name={name!r}: timm has no model {arch!r}; {hint}")


def create_timm_model(name: str, num_classes: int, in_channels: int, dropout: float,
                      drop_path: float | None) -> nn.Module:
    """timm.create_model(pretrained=False) with our head size, input channels, dropout (timm's drop_rate, left out
    where the model has none) and drop path (drop_path_rate: the deepest block's probability, linear in depth)."""
    import timm

    arch = check_timm_name(name)
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_channels}
    if dropout:
        kwargs["drop_rate"] = dropout
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    while True:
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as exc:
            if "drop_path_rate" in kwargs and "drop_path_rate" in str(exc):
                raise ValueError(f"model.drop_path is not taken by {name} (its timm constructor has no "
                                 "drop_path_rate); use a family with stochastic depth (resnet*, efficientnet*, "
                                 "convnext*, regnet*, mobilenetv3_*, ...) or model.drop_path=null") from None
            if "drop_rate" not in kwargs or "drop_rate" not in str(exc):
                raise
            del kwargs["drop_rate"]  # as for torchvision models: dropout is dropped where the model has none


def is_timm_model(model: nn.Module) -> bool:
    """A model built by timm (it carries its pretrained config and a layer-group matcher)."""
    return hasattr(model, "pretrained_cfg") and callable(getattr(model, "group_matcher", None))


def _group_name(param_name: str, matcher: dict) -> str:
    """The name of the timm group a parameter opens: the text its pattern matched when the pattern numbers its
    groups (layer1, blocks.3, stages.2), else the matcher's key (stem); parameters no pattern matches: head."""
    for key, spec in matcher.items():
        patterns = [spec] if isinstance(spec, str) else [s[0] for s in spec or []]
        for pattern in patterns:
            found = re.match(pattern, param_name)
            if found:
                return found.group(0) if found.groups() else key
    return "head"


def timm_layer_groups(model: nn.Module) -> list[tuple[str, list[str]]] | None:
    """(group name, parameter names) from input to output, as timm's coarse (stage-level) `group_matcher` cuts the
    model (what timm's layer decay uses, one stage per group); None when the model has no dict matcher."""
    from timm.models import group_parameters

    matcher = model.group_matcher(coarse=True)
    if not isinstance(matcher, dict):
        return None
    by_id = group_parameters(model, matcher)
    groups, seen = [], set()
    for layer_id in sorted(by_id):
        names = by_id[layer_id]
        name = _group_name(names[0], matcher)  # the first parameter is the group's own (merged ones come after)
        while name in seen:
            name += "+"
        seen.add(name)
        groups.append((name, names))
    return groups


def timm_pretrained_input(name: str) -> dict | None:
    """image_size / mean / std / crop_pct of a timm model's pretrained config (its default tag, or the one in the
    name); None when timm has none for it."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(check_timm_name(name))
    return None if cfg is None else input_of_pretrained_cfg(cfg.to_dict())


def input_of_pretrained_cfg(cfg: dict) -> dict:
    """Our data settings from a timm pretrained_cfg dict (also the `pretrained_cfg` of a hub folder's config.json)."""
    return {"image_size": int(cfg["input_size"][-1]), "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]], "crop_pct": float(cfg.get("crop_pct") or 0.875)}
