"""This process's network counters: retries, resumed connections and shards given up (see `pipeline.data.io.remote`).

The stream adds their per-batch deltas to the batches' fault counts.
"""

_COUNTERS = {"retries": 0, "resumed": 0, "failed": 0}


def count(name: str) -> None:
    """One more `name` (retries, resumed or failed)."""
    _COUNTERS[name] += 1


def net_counters() -> dict[str, int]:
    """This process's cumulative network counters: retries, resumed, failed (see the module docstring)."""
    return dict(_COUNTERS)
