"""Checkpointing: atomic, verified checkpoint folders and safetensors weights."""

from pipeline.checkpointing.checkpointer import (
    EMA_WEIGHTS,
    Checkpointer,
    load_weights,
    save_weights,
    verify,
)

__all__ = ["EMA_WEIGHTS", "Checkpointer", "load_weights", "save_weights", "verify"]
