"""A training pipeline for convolutional image classifiers: shards -> Accelerate loop -> checkpoints -> metrics."""

__version__ = "0.1.0"
