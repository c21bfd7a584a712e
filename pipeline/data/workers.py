"""The loader's worker processes: how they start, what they ignore, and how they end on every exit path.

- **Start.** Workers come from a forkserver by default (`worker_context`), so they cannot inherit a lock held
  by one of the main process's threads; the server and multiprocessing's resource tracker start deaf to the
  stop signals.
- **Signals.** Every process of a job gets the scheduler's signals (SLURM signals the whole step), but the
  main process decides what a signal means: workers ignore `STOP_SIGNALS` (`OwnedProcess`).
- **End.** The main process ends its workers itself, on every exit path (`shutdown_workers`, called by the
  CLI whatever the outcome and at interpreter exit). Since they ignore SIGTERM, "terminate" means SIGKILL for
  them (they only read): DataLoader's own shutdown and multiprocessing's exit handler (terminate, then join)
  would otherwise wait for them forever, which parked any script that raised with its loaders alive.
- **Owner.** Every process of `worker_context`, whoever builds the DataLoader (ours, a plain one in a
  benchmark), dies with the process that started it, however that ended (SIGKILL included): a worker watches
  its owner through a pidfd, a forkserver's worker also gets SIGKILL when the server ends (parent-death
  signal), and the server gets SIGKILL when its owner ends (parent-death signal too; else it would leave once
  no process holds its "alive" pipe any more, the workers closing the copy they inherit).
- **Stuck.** A worker that delivers nothing for `data.worker_timeout_s` ends the run (`WorkerStuck`, exit
  76) with one line naming it and what it was reading, instead of a silent wait for ever.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.context
import os
import select
import signal
import threading
import time
import weakref
from typing import Callable, Iterator

from torch.utils.data import DataLoader

from pipeline.config.schema import SIGNAL_NAMES

STOP_SIGNALS = tuple(getattr(signal, name) for name in SIGNAL_NAMES)
"""Signals the loader's processes ignore: every one `checkpoint.signals` may name, and SIGINT."""

_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def worker_options(num_workers: int, start_method: str, timeout_s: float = 0.0) -> dict:
    """DataLoader arguments for `num_workers` persistent worker processes started by `start_method` (none for 0),
    in `worker_context`; with `timeout_s`, waiting longer than that for a worker's next batch raises (see
    `WorkerStuck`)."""
    if num_workers <= 0:
        return {}
    return {"multiprocessing_context": worker_context(start_method), "persistent_workers": True,
            "prefetch_factor": 4, "timeout": timeout_s}


def worker_context(start_method: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context loader workers start in. A forkserver's workers are forked from a
    single-threaded server that has already imported the stream and decoding modules (what a worker unpickles), so
    they start quickly and cannot inherit a lock held by one of the main process's threads (W&B, pin-memory,
    progress bar).

    Its processes are `OwnedProcess`es: deaf to `STOP_SIGNALS`, ended by SIGKILL when terminated, and gone
    once the process that started them has ended. The helper processes multiprocessing needs besides the
    workers (the server, the resource tracker) are started here, deaf to `STOP_SIGNALS`: a scheduler that
    signals every process of a job would otherwise end them, and DataLoader's workers leave when their parent,
    the server, is gone. Both leave by themselves once the main process has ended (their pipes to it close).
    """
    context = _OWNED_CONTEXTS[start_method]
    if start_method == "forkserver":
        context.set_forkserver_preload(["pipeline.data.stream", "pipeline.data.samples.decode"])
    if start_method != "fork":
        from multiprocessing import forkserver, resource_tracker

        _start_deaf(_quiet(resource_tracker.ensure_running))  # before the server, which would start it hearing
        if start_method == "forkserver":
            _start_deaf(_owned(forkserver.ensure_running))
    return context


def _start_deaf(start: Callable[[], None]) -> None:
    """Run `start` with `STOP_SIGNALS` blocked: a process it starts inherits the mask (across exec too) and
    never receives them; any sent meanwhile reach this process once they are unblocked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


OWNER_ENV = "PIPELINE_WORKERS_OWNER"
"""Set (to the owner's pid) only while the forkserver starts: the server reads it when it imports this module."""


def _owned(start: Callable[[], None]) -> Callable[[], None]:
    """`start` for the forkserver, which then gets SIGKILL as soon as this process ends (`_adopted_by_owner`):
    left to itself it would leave only once no process holds its "alive" pipe, then spend seconds in the
    interpreter's teardown. Only from the main thread: the parent-death signal follows the thread that started
    the server, and a thread that ends earlier than the process would take the server with it."""

    def started() -> None:
        if threading.current_thread() is not threading.main_thread():
            start()
            return
        os.environ[OWNER_ENV] = str(os.getpid())
        try:
            start()
        finally:
            os.environ.pop(OWNER_ENV, None)

    return started


def _adopted_by_owner() -> None:
    """In the forkserver (which imports this module with `pipeline.data.stream`): die with the owner (`_owned`)."""
    owner = os.environ.pop(OWNER_ENV, "")
    if owner.isdigit() and os.getppid() == int(owner):
        _die_with_parent()


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


class OwnedProcess(multiprocessing.process.BaseProcess):
    """A worker process that belongs to the process that started it (its owner); mixed into the start method's
    own Process class (`_OWNED_CONTEXTS`).

    In the worker (`run`): `STOP_SIGNALS` are ignored (the owner decides what a scheduler's signal means, and a
    worker must not die before the owner saved its checkpoint), and the worker leaves as soon as its owner has
    ended (`_bind_to_owner`). In the owner: `terminate` is SIGKILL, since SIGTERM is ignored (a worker only
    reads; nothing is lost).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._owner_pid = os.getpid()

    def run(self) -> None:
        _bind_to_owner(self._owner_pid)
        super().run()

    def terminate(self) -> None:
        self.kill()


def _bind_to_owner(owner_pid: int) -> None:
    """In a new worker: ignore `STOP_SIGNALS`, and end when process `owner_pid` has ended, however it ended.

    DataLoader's workers watch their parent, which for a forkserver's worker is the server, not the owner:
    without this, a SIGKILLed (preempted, OOM-killed) run would leave them, and the server, waiting forever.
    - The worker closes its copy of the forkserver's "alive" pipe (multiprocessing hands one to every process
      the server forks): the server then reads EOF, and leaves, as soon as the owner is gone.
    - A worker whose parent is not the owner (the server's) gets SIGKILL when that parent ends (parent-death
      signal), stopped (SIGSTOP) or busy as it may be. The server is single-threaded, so "parent" cannot mean a
      thread that ends earlier; a worker the owner forked itself relies on the watch below alone.
    - A thread watches the owner (pidfd) and ends the worker when it is gone.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Blocked as well (as in the forkserver, `_start_deaf`): DataLoader's worker loop, which starts after this,
    # installs its own SIGTERM handler (exit when the parent sent it, else die of it); a blocked signal never
    # reaches it. Threads started later (the owner watch) inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from multiprocessing import forkserver

    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass
        forkserver._forkserver._forkserver_alive_fd = None
    if os.getppid() != owner_pid:
        _die_with_parent()
    threading.Thread(target=_exit_after, args=(owner_pid,), name="owner-watch", daemon=True).start()


def _die_with_parent() -> None:
    """SIGKILL this process when its parent ends (Linux prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os._exit(0)


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


class _ForkServerWorker(OwnedProcess, multiprocessing.context.ForkServerProcess):
    pass


class _SpawnWorker(OwnedProcess, multiprocessing.context.SpawnProcess):
    pass


class _ForkWorker(OwnedProcess, multiprocessing.context.ForkProcess):
    pass


class _ForkServerContext(multiprocessing.context.ForkServerContext):
    Process = _ForkServerWorker


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _SpawnWorker


class _ForkContext(multiprocessing.context.ForkContext):
    Process = _ForkWorker


_OWNED_CONTEXTS = {"forkserver": _ForkServerContext(), "spawn": _SpawnContext(), "fork": _ForkContext()}
"""The start methods' contexts, each making `OwnedProcess`es (classes at module level: they are pickled)."""


def timed_out(exc: BaseException) -> bool:
    """Whether `exc` is DataLoader's own "timed out" error (its `timeout` argument, see `worker_options`)."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader timed out after")


def waited_on(loader: DataLoader) -> int | None:
    """The worker whose batch `loader`'s iterator waits for (DataLoader hands out batches round-robin and returns
    them in order: the worker of the first batch not yet received); None while none is due (a new epoch's start)."""
    iterator = loader._iterator
    info = getattr(iterator, "_task_info", {}).get(getattr(iterator, "_rcvd_idx", -1))
    return info[0] if info else None


def worker_pid(loader: DataLoader, worker: int) -> int | None:
    """The process id of `loader`'s worker `worker` (None if it has none)."""
    workers = getattr(loader._iterator, "_workers", [])
    return workers[worker].pid if 0 <= worker < len(workers) else None


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


def shutdown_workers(grace_s: float = 0.5) -> int:
    """End the worker processes of every tracked loader, and every other `OwnedProcess` this process started (a
    plain DataLoader's in `worker_context`), now; returns how many were still running.

    Workers hold nothing that must be saved (they only read shards), so after `grace_s` for the ones that
    were already leaving they are killed: they ignore SIGTERM, and a worker stuck in a read (or stopped) must
    not hold the exit up. The iterators are then closed as DataLoader closes them (queues, pin-memory thread),
    which finds their workers gone and returns at once.
    """
    iterators = [it for it in (getattr(loader, "_iterator", None) for loader in list(_LOADERS))
                 if it is not None and hasattr(it, "_workers")]
    processes = [p for it in iterators for p in it._workers if p.is_alive()]
    others = [p for p in multiprocessing.active_children() if isinstance(p, OwnedProcess) and p not in processes]
    for it in iterators:
        _forget_pids(it)
    for it in iterators:
        it._workers_done_event.set()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    with _sigchld_default():  # an untracked loader's workers: its SIGCHLD check would call their end a failure
        for process in processes + others:
            if process.is_alive():
                process.kill()
        for process in processes + others:
            process.join(timeout=5.0)
    for it in iterators:
        try:
            it._shutdown_workers()
        except Exception:  # noqa: BLE001 - best effort: the processes are gone, only queues are left
            pass
    for loader in list(_LOADERS):
        loader._iterator = None
    return len(processes) + len(others)


@contextlib.contextmanager
def _sigchld_default() -> Iterator[None]:
    """SIGCHLD's default action inside the block (main thread only; elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def _forget_pids(iterator: object) -> None:
    """Take the iterator's workers off DataLoader's SIGCHLD watch, so that ending them is not reported as a
    worker failure ('DataLoader worker (pid N) is killed by signal')."""
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data import _utils

        _utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False


_adopted_by_owner()
