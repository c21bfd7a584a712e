"""The search space: which config keys a trial changes, and how Optuna draws their values.

In YAML, under `tune.space`, one entry per dotted config key:

    optim.lr:       {type: float, low: 1.0e-4, high: 0.3, log: true}
    model.dropout:  {type: float, low: 0.0, high: 0.5, step: 0.1}
    train.batch_size: {type: int, low: 16, high: 128, log: true}
    optim.name:     {type: categorical, choices: [sgd, adamw]}
    optim.momentum: {type: float, low: 0.5, high: 0.99, when: {optim.name: sgd}}
    model.channels: {type: categorical, choices: [[8, 16], [16, 32]]}

`when` makes a parameter conditional: it is drawn only if every named key (an earlier parameter or,
failing that, the base config) has the given value (or one of a list of values); otherwise the
base config's value stays. Entries are drawn in file order, conditions before what they gate.
`type` may be left out: `choices` means categorical, integer `low`/`high` mean int, anything else float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline.config import Config, ConfigError
from pipeline.errors import first_line

SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
TYPES = ("float", "int", "categorical")
_MISSING = object()


def _label(choice: Any) -> Any:
    """Optuna stores only None/bool/int/float/str; anything else (a list of channels) becomes its YAML text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True).strip()


@dataclass
class Param:
    """One searched config key."""

    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list] = None
    when: Optional[dict] = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            labels = [_label(c) for c in self.choices]
            label = trial.suggest_categorical(self.key, labels)
            return self.choices[labels.index(label)]
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list:
        """Every value a grid search visits."""
        if self.type == "categorical":
            return [_label(c) for c in self.choices]
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError(f"tune.space.{self.key}: sampler=grid needs a `step` (or `choices`) for float ranges")
        count = int(round((self.high - self.low) / self.step)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def applies(self, chosen: dict, base: Any) -> bool:
        for key, wanted in (self.when or {}).items():
            value = chosen[key] if key in chosen else OmegaConf.select(base, key, default=None)
            if value not in (wanted if isinstance(wanted, list) else [wanted]):
                return False
        return True


def _param(key: str, spec: Any, base: Any) -> Param:
    where = f"tune.space.{key}"
    if OmegaConf.select(base, key, default=_MISSING) is _MISSING or isinstance(OmegaConf.select(base, key), DictConfig):
        raise ConfigError(f"{where}: '{key}' is not a config value; search keys like optim.lr, train.batch_size, "
                          "model.dropout, optim.name")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping such as {{type: float, low: 1e-4, high: 1e-1, log: true}}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(SPEC_KEYS))}")
    kind = spec.get("type") or ("categorical" if "choices" in spec else
                                "int" if all(isinstance(spec.get(b), int) for b in ("low", "high")) else "float")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type={kind!r} is not valid; choose one of {', '.join(TYPES)}")
    when = spec.get("when")
    if when is not None and not isinstance(when, dict):
        raise ConfigError(f"{where}: `when` must map config keys to values, e.g. {{optim.name: sgd}}")
    param = Param(key, kind, spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step"),
                  spec.get("choices"), when)
    if kind == "categorical":
        if not isinstance(param.choices, list) or not param.choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list `choices`")
        return param
    for bound in ("low", "high"):
        value = getattr(param, bound)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {kind} needs a numeric `{bound}` (got {value!r})")
    if param.low > param.high:
        raise ConfigError(f"{where}: low={param.low} is larger than high={param.high}")
    if param.log and (param.low <= 0 or param.step is not None):
        raise ConfigError(f"{where}: log=true needs low > 0 and no step")
    if param.step is not None and param.step <= 0:
        raise ConfigError(f"{where}: step={param.step} must be > 0")
    return param


class SearchSpace:
    """Ordered parameters; `suggest` turns an Optuna trial into config overrides {dotted key: value}."""

    def __init__(self, space: dict, base: Config):
        conf = OmegaConf.structured(base)
        self.base = conf
        self.params = [_param(str(key), spec, conf) for key, spec in space.items()]
        known = {p.key for p in self.params}
        for param in self.params:
            for key in param.when or {}:
                if key not in known and OmegaConf.select(conf, key, default=_MISSING) is _MISSING:
                    raise ConfigError(f"tune.space.{param.key}: `when` names '{key}', which is not a config key")
        self.params = self._conditions_first(self.params)

    @staticmethod
    def _conditions_first(params: list[Param]) -> list[Param]:
        """File order, except that a parameter comes after the searched keys its `when` depends on."""
        ordered: list[Param] = []
        pending = list(params)
        while pending:
            placed = {p.key for p in ordered}
            ready = [p for p in pending if all(k in placed or k not in {q.key for q in pending} for k in p.when or {})]
            if not ready:
                raise ConfigError(f"tune.space: the `when` conditions of {', '.join(p.key for p in pending)} "
                                  "depend on each other in a cycle")
            ordered.append(ready[0])
            pending.remove(ready[0])
        return ordered

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.applies(chosen, self.base):
                chosen[param.key] = param.suggest(trial)
        return chosen

    def grid(self) -> dict[str, list]:
        return {param.key: param.grid() for param in self.params}


def apply_overrides(base: Config, overrides: dict[str, Any], **run: str) -> Config:
    """`base` with `overrides` (dotted keys) and run.* fields set; validated like a loaded config."""
    conf = OmegaConf.structured(base)
    try:
        for key, value in {**overrides, **{f"run.{k}": v for k, v in run.items()}}.items():
            OmegaConf.update(conf, key, value, merge=False)
        config = OmegaConf.to_object(conf)
    except Exception as exc:  # noqa: BLE001 - OmegaConf validation or a __post_init__ check
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc
        raise ConfigError(f"trial config {overrides} is invalid: {first_line(cause)}") from None
    assert isinstance(config, Config)
    return config
