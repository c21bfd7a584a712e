"""Checkpointing: atomic, verified checkpoint folders and safetensors weights."""

from pipeline.checkpointing.checkpointer import Checkpointer, CheckpointWriteError, load_weights, save_weights, verify

__all__ = ["CheckpointWriteError", "Checkpointer", "load_weights", "save_weights", "verify"]
