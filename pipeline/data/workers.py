"""The loader's worker processes: how they start, what they ignore, and how they end on every exit path.

- **Start.** Workers come from a forkserver by default (`worker_context`), so they cannot inherit a lock held
  by one of the main process's threads; the server and multiprocessing's resource tracker start deaf to the
  stop signals.
- **Signals.** Every process of a job gets the scheduler's signals (SLURM signals the whole step), but the
  main process decides what a signal means: workers ignore `STOP_SIGNALS` (`init_worker`).
- **End.** The main process ends its workers itself, on every exit path (`shutdown_workers`, called by the
  CLI whatever the outcome and at interpreter exit): since they ignore SIGTERM, multiprocessing's own exit
  handler (terminate, then join) would wait for them forever. A worker also leaves by itself once the main
  process has ended, however it ended (SIGKILL included), through a pidfd watch.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.context
import os
import select
import signal
import threading
import time
import weakref
from functools import partial
from typing import Callable

from torch.utils.data import DataLoader

from pipeline.config.schema import SIGNAL_NAMES

STOP_SIGNALS = tuple(getattr(signal, name) for name in SIGNAL_NAMES)
"""Signals the loader's processes ignore: every one `checkpoint.signals` may name, and SIGINT."""

_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def worker_options(num_workers: int, start_method: str) -> dict:
    """DataLoader arguments for `num_workers` persistent worker processes started by `start_method` (none for 0):
    the context (`worker_context`) and the init that makes each one deaf to the stop signals and watch the main
    process (`init_worker`)."""
    if num_workers <= 0:
        return {}
    return {"multiprocessing_context": worker_context(start_method), "persistent_workers": True,
            "prefetch_factor": 4, "worker_init_fn": partial(init_worker, os.getpid())}


def worker_context(start_method: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context loader workers start in. A forkserver's workers are forked from a
    single-threaded server that has already imported the stream module, so they start quickly and cannot
    inherit a lock held by one of the main process's threads (W&B, pin-memory, progress bar).

    The helper processes multiprocessing needs besides the workers (the server, the resource tracker)
    are started here, deaf to `STOP_SIGNALS`: a scheduler that signals every process of a job would
    otherwise end them, and DataLoader's workers leave when their parent, the server, is gone. Both leave by
    themselves once the main process has ended (their pipes to it close).
    """
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(["pipeline.data.stream"])
    if start_method != "fork":
        from multiprocessing import forkserver, resource_tracker

        _start_deaf(_quiet(resource_tracker.ensure_running))  # before the server, which would start it hearing
        if start_method == "forkserver":
            _start_deaf(forkserver.ensure_running)
    return context


def _start_deaf(start: Callable[[], None]) -> None:
    """Run `start` with `STOP_SIGNALS` blocked: a process it starts inherits the mask (across exec too) and
    never receives them; any sent meanwhile reach this process once they are unblocked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _quiet(start: Callable[[], None]) -> Callable[[], None]:
    """`start` for the resource tracker, which then does not warn about the semaphores it unlinks after this
    process ended at once (a second Ctrl-C exits with `os._exit`): cleaning them up is its job, and the warning
    would only follow the run's last line. The tracker reads PYTHONWARNINGS when it starts."""

    def started() -> None:
        previous = os.environ.get("PYTHONWARNINGS")
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [previous, "ignore:resource_tracker:UserWarning"]))
        try:
            start()
        finally:
            if previous is None:
                del os.environ["PYTHONWARNINGS"]
            else:
                os.environ["PYTHONWARNINGS"] = previous

    return started


def init_worker(main_pid: int, worker_id: int = 0) -> None:
    """Worker init, whatever the start method: ignore `STOP_SIGNALS`, and leave as soon as process
    `main_pid` (the main process) has ended, however it ended.

    A forkserver's worker would die of the default action of a scheduler's signal before the main process
    saved its checkpoint. And DataLoader's workers watch their parent, which for a forkserver's worker is the
    server, not the main process: without the watch here, a SIGKILLed (preempted, OOM-killed) run would leave
    them, and the server, waiting forever.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_after, args=(main_pid,), name="main-process-watch", daemon=True).start()


def _exit_after(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)  # readable once the process has ended
    except ProcessLookupError:
        os._exit(0)
    except OSError:  # no pidfd (Linux < 5.3): poll
        while _alive(pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([handle], [], [])
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or reused by another user's process: ours has ended
        return False
    return True


def track(loader: DataLoader) -> DataLoader:
    """Remember `loader` so that `shutdown_workers` ends its workers; returns it."""
    global _ATEXIT_REGISTERED
    _LOADERS.add(loader)
    if not _ATEXIT_REGISTERED:
        # Registered after multiprocessing's own exit handler, hence run before it: by then no worker is left
        # for it to wait on. (For Python API users; the CLI calls shutdown_workers itself.)
        atexit.register(shutdown_workers)
        _ATEXIT_REGISTERED = True
    return loader


def shutdown_workers(grace_s: float = 2.0) -> int:
    """End the worker processes of every tracked loader now; returns how many were still running.

    Workers hold nothing that must be saved (they only read shards), so after `grace_s` for the ones that
    were already leaving they are killed: they ignore SIGTERM, and a worker stuck in a read must not hold
    the exit up. The iterators are then closed as DataLoader closes them (queues, pin-memory thread), which
    finds their workers gone and returns at once.
    """
    iterators = [it for it in (getattr(loader, "_iterator", None) for loader in list(_LOADERS))
                 if it is not None and hasattr(it, "_workers")]
    processes = [p for it in iterators for p in it._workers if p.is_alive()]
    for it in iterators:
        _forget_pids(it)
    for it in iterators:
        it._workers_done_event.set()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5.0)
    for it in iterators:
        try:
            it._shutdown_workers()
        except Exception:  # noqa: BLE001 - best effort: the processes are gone, only queues are left
            pass
    for loader in list(_LOADERS):
        loader._iterator = None
    return len(processes)


def _forget_pids(iterator: object) -> None:
    """Take the iterator's workers off DataLoader's SIGCHLD watch, so that ending them is not reported as a
    worker failure ('DataLoader worker (pid N) is killed by signal')."""
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data import _utils

        _utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
