"""Tracking: console progress, metrics.jsonl, and W&B (or a do-nothing stand-in)."""
