"""How many intra-op threads the training process gives torch.

torch starts one thread per core, and each loader worker is a busy process of its own: on a 2-core machine the
main process's two OpenMP threads and two workers fight over two cores, and OpenMP's spinning threads collapse
when anything else runs there (measured: 20-65 images/s against 600+ with one thread). `auto` leaves a core to
each worker: this node's usable cores, shared by its ranks, minus the workers, at least 1.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or SLURM's share), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(setting: str, num_workers: int, local_ranks: int, cores: int | None = None,
                   env: dict | None = None) -> tuple[int, str]:
    """The thread count for `setting` (train.cpu_threads) and a few words on why, for the start line."""
    env = os.environ if env is None else env
    if setting != "auto":
        return int(setting), "train.cpu_threads"
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) >= 1:
        return int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = usable_cores() if cores is None else cores
    per_rank = max(1, cores // max(1, local_ranks))
    threads = max(1, per_rank - num_workers)
    ranks = f" / {local_ranks} ranks" if local_ranks > 1 else ""
    return threads, f"auto: {cores} cores{ranks} - {num_workers} loader workers"


def set_threads(setting: str, num_workers: int, local_ranks: int) -> str:
    """Give torch the chosen number of intra-op threads; the start line's words ('2 threads (auto: ...)')."""
    threads, why = choose_threads(setting, num_workers, local_ranks)
    torch.set_num_threads(threads)
    return f"{threads} thread{'s' if threads != 1 else ''} ({why})"


NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
"""/proc/cpuinfo flags of the units that compute each reduced precision; without one, CPU autocast emulates it."""


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The first CPU's feature flags, or None where they cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as source:
            for line in source:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_precision_warning(precision: str, flags: set[str] | None = None) -> str:
    """One line when `precision` (bf16/fp16) would run on a CPU without units for it, else ''.

    Measured on an AMD EPYC with AVX2 only (2 cores, configs/cifar10_cpu.yaml's network): bf16 autocast trained at
    29-44 images/s, fp32 at 254-269; on an Intel Xeon with AMX, bf16 ran 2.0-2.6x faster than fp32."""
    wanted = NATIVE_CPU_FLAGS.get(precision)
    flags = cpu_flags() if flags is None else flags
    if wanted is None or flags is None or flags & set(wanted):
        return ""
    return (f"warning: train.precision={precision} on a CPU without {' or '.join(wanted)}: autocast emulates it, "
            f"several times slower than fp32 (measured 6-9x); train.precision=fp32 is faster on this machine")
