"""Hyperparameter search with Optuna: search space over any config key, pruning, shared-database workers."""

from pipeline.commands.tune.config import load_tune_config
from pipeline.commands.tune.space import SearchSpace, apply_overrides

__all__ = ["SearchSpace", "apply_overrides", "load_tune_config", "tune_study"]


def tune_study(config_path, overrides=()):  # noqa: ANN001, ANN201 - lazy: keeps `import pipeline.commands.tune` light
    from pipeline.commands.tune.study import tune_study as run

    return run(config_path, overrides)
