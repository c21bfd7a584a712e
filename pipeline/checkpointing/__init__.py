"""Checkpointing: atomic, verified checkpoint folders and safetensors weights."""

from pipeline.checkpointing.checkpointer import Checkpointer, load_weights, save_weights, verify

__all__ = ["Checkpointer", "load_weights", "save_weights", "verify"]
