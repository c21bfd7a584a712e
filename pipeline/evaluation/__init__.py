"""Evaluation: metrics, the evaluation loop, and re-evaluating finished runs."""
