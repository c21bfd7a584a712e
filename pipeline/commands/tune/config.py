"""The `tune:` section of a tuning YAML, and how a tuning file splits into search settings + base config.

A tuning file is an ordinary training config (data:, model:, optim:, ...) plus one `tune:` section.
The training sections are the *base config* every trial starts from; `tune.space` says which keys
each trial changes. `tune.base_config` may name another YAML (e.g. configs/default.yaml) that is
loaded first, so a tuning file can be just a `tune:` section on top of an existing config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.config import Config, ConfigError
from pipeline.config.loader import _parse_overrides, merge_layers, read_yaml
from pipeline.errors import first_line

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
STORAGE_ENV = "PIPELINE_TUNE_STORAGE"


@dataclass
class TuneConfig:
    """An Optuna study: where it lives, how it samples and prunes, its budget and its search space."""

    study_name: str = "study"
    """Study name; also the study folder <output_dir>/<study_name>/ and the name inside the database."""
    output_dir: str = "runs/tune"
    """Parent folder of study folders (trial run folders go to <study folder>/trials/)."""
    storage: Optional[str] = None
    """Database URL (sqlite:///..., postgresql://user@host/db); null: $PIPELINE_TUNE_STORAGE if set,
    else an SQLite file study.db in the study folder. Passwords are never printed or saved."""
    base_config: Optional[str] = None
    """YAML loaded first as the base config (the tuning file's own sections go on top); null: none."""
    sampler: str = "tpe"
    """tpe (Bayesian, default), random, or grid (every param needs `choices` or a `step`)."""
    pruner: str = "median"
    """median, hyperband, or none: stops trials whose per-epoch metric is poor."""
    n_trials: Optional[int] = 20
    """Trials the whole study should have (all workers together; failed ones are not counted);
    null: no count limit (timeout_s, or an exhausted grid, ends the study)."""
    timeout_s: Optional[float] = None
    """Seconds after which this worker starts no new trial (a running trial is finished); null: none."""
    metric: str = "val/accuracy"
    """Epoch-record key to optimise (reported every epoch for pruning); a trial's value is its best epoch."""
    direction: str = "maximize"
    """maximize or minimize `metric`."""
    seed: int = 0
    """Sampler seed; worker_index and the study's trial count at start are mixed in, so parallel or
    restarted workers do not draw the same points."""
    worker_index: int = 0
    """This worker's index among parallel workers (slurm/tune.sbatch passes the array task id)."""
    sampler_startup_trials: int = 5
    """tpe: random trials before the Bayesian model takes over."""
    pruner_startup_trials: int = 3
    """median: completed trials before any trial may be pruned."""
    pruner_warmup_epochs: int = 1
    """median: epochs every trial completes before it may be pruned (0: pruning from epoch 1 on);
    hyperband: its minimum resource (at least 1 epoch)."""
    heartbeat_s: int = 30
    """Seconds between a running trial's heartbeats in the database."""
    grace_s: int = 120
    """A running trial without a heartbeat for this long is marked failed (its worker died) and retried."""
    max_retries: int = 1
    """How often a trial whose worker died is retried with the same parameters (0: never)."""
    max_consecutive_failures: int = 3
    """Stop this worker after this many failed trials in a row (e.g. a space that gives invalid configs)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: config key -> {type: float|int|categorical, low, high, log, step, choices, when}."""

    def __post_init__(self) -> None:
        if not self.study_name or "/" in self.study_name:
            raise ValueError(f"tune.study_name={self.study_name!r} must be a non-empty name without '/'")
        for key, value, choices in (("tune.sampler", self.sampler, SAMPLERS), ("tune.pruner", self.pruner, PRUNERS),
                                    ("tune.direction", self.direction, DIRECTIONS)):
            if value not in choices:
                raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")
        if self.n_trials is not None and self.n_trials < 0:
            raise ValueError(f"tune.n_trials={self.n_trials} must be >= 0 (or null for no count limit)")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"tune.timeout_s={self.timeout_s} must be > 0 (or null for no time limit)")
        if self.n_trials is None and self.timeout_s is None and self.sampler != "grid":
            raise ValueError("tune.n_trials and tune.timeout_s are both null; set at least one budget")
        if "/" not in self.metric:
            raise ValueError(f"tune.metric={self.metric!r} must be an epoch-record key such as val/accuracy")
        for key in ("worker_index", "sampler_startup_trials", "pruner_startup_trials", "pruner_warmup_epochs",
                    "max_retries"):
            if getattr(self, key) < 0:
                raise ValueError(f"tune.{key}={getattr(self, key)} must be >= 0")
        for key in ("heartbeat_s", "grace_s", "max_consecutive_failures"):
            if getattr(self, key) < 1:
                raise ValueError(f"tune.{key}={getattr(self, key)} must be >= 1")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"tune.grace_s={self.grace_s} must be larger than tune.heartbeat_s={self.heartbeat_s}")
        if not self.space:
            raise ValueError("tune.space is empty; give at least one config key to search, "
                             "e.g. tune.space: {optim.lr: {type: float, low: 1e-4, high: 1e-1, log: true}}")

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir) / self.study_name

    def storage_url(self) -> str:
        """The database URL this study uses (see `storage`)."""
        if self.storage:
            return self.storage
        if os.environ.get(STORAGE_ENV):
            return os.environ[STORAGE_ENV]
        return f"sqlite:///{(self.study_dir / 'study.db').resolve()}"


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found (pass an existing YAML file, e.g. configs/tune_digits.yaml)")
    try:
        data = read_yaml(path) or {}  # size, depth and aliases checked before anything is built
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping (tune:, data:, model:, ...)")
    return data


def load_tune_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[TuneConfig, Config]:
    """Split the tuning file into (TuneConfig, base Config); `tune.*` overrides go to the former."""
    path = Path(path)
    data = _read_yaml(path, "tuning file")
    tune_data = data.pop("tune", None)
    if not isinstance(tune_data, dict):
        raise ConfigError(f"tuning file '{path}' has no 'tune:' section (with at least tune.space)")
    tune_overrides = [o for o in overrides if o.startswith("tune.")]
    base_overrides = [o for o in overrides if not o.startswith("tune.")]
    for item in tune_overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. tune.n_trials=8)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TuneConfig), OmegaConf.create(tune_data),
                                 OmegaConf.from_dotlist([o[len("tune."):] for o in tune_overrides]))
        tune = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else None
        key = getattr(exc, "full_key", "") or ""
        detail = str(cause) if cause else f"bad tune setting '{key}': {first_line(exc)}"
        if isinstance(exc, ConfigKeyError) and not cause:
            names = [f"tune.{f.name}" for f in dataclasses.fields(TuneConfig)]
            close = difflib.get_close_matches(f"tune.{key}", names, n=1, cutoff=0.6)
            detail = (f"unknown tune setting 'tune.{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
                      + f"; valid: {', '.join(names)}")
        raise ConfigError(f"{detail} (in '{path}' or the command line)") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    assert isinstance(tune, TuneConfig)
    layers: list[tuple[object, str]] = []
    if tune.base_config:
        base_path = Path(tune.base_config)
        if not base_path.is_file() and (path.parent / base_path).is_file():
            base_path = path.parent / base_path
        layers.append((_read_yaml(base_path, "tune.base_config"), str(base_path)))
    layers.append((data, str(path)))
    if base_overrides:
        layers.append((_parse_overrides(base_overrides), "command line"))
    return tune, merge_layers(layers)


