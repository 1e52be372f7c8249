"""The worker processes of a local run: started from the model's bytes, replaced when one dies, never orphaned.

Why a module of its own: the lifecycle of worker processes is where a night's run is lost
(a pool that broke between batches, workers that outlive a killed parent, a replacement worker
that loads a model file changed on disk since the run began). :class:`WorkerPool` is the one
place that starts, replaces and ends them; :mod:`wbc_batch.inference.local_engine` only decides
which batches to send and what a crash means for their rows.

- Workers get the model as *bytes* read once by the main process (through a queue, not the spawn pipe), so every worker, first or
  replacement, runs the model whose sha256 the sidecar records.
- A worker exits when its parent dies, however it dies (SIGKILL included): on Linux the kernel
  sends it SIGKILL (``PR_SET_PDEATHSIG``); everywhere a watchdog thread notices the parent's pid
  change. So no worker (and no resource tracker, which lives as long as they do) is left behind.
- Workers ignore SIGINT: Ctrl-C reaches the whole process group, and stopping is the parent's call.
- :meth:`WorkerPool.start` runs one empty task first, so workers that cannot even start (a script
  without a ``__main__`` guard, a model they cannot load) are an error before any row is written.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.queues import Queue

from ..errors import ExitCode, WbcBatchError
from .engine import run_batch
from .model import Model, model_from_bytes
from .rows import BatchResult

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WATCHDOG_S = 1.0
_MODEL_WAIT_S = 600.0  # a worker waits this long for its copy of the model (the parent writes it at once)

_worker_model: Model | None = None  # one per worker process, set by its initializer


class WorkerError(WbcBatchError):
    """The worker processes cannot start, or keep dying: the run stops (rows written so far are kept)."""

    exit_code = ExitCode.FAILURE


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` is gone: the kernel's death signal where there is one, a watchdog always."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="wbc-batch-parent-watch").start()


def _watch_parent(parent_pid: int, every_s: float = _WATCHDOG_S) -> None:
    while os.getppid() == parent_pid:  # re-parented (to init or a subreaper) once the parent is gone
        time.sleep(every_s)
    os._exit(1)


def _init_worker(models: Queue, model_path: str, provider: str, threads: int, parent_pid: int) -> None:
    global _worker_model
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent(parent_pid)
    model_bytes = models.get(timeout=_MODEL_WAIT_S)  # one copy per worker (see WorkerPool._new)
    _worker_model = model_from_bytes(model_bytes, model_path, provider=provider, threads=threads, spinning=False)


def work(paths: Sequence[str]) -> BatchResult:
    """The task a worker runs: one batch through the model its initializer built."""
    assert _worker_model is not None
    return run_batch(_worker_model, paths)


def is_spawned_worker_bootstrapping() -> bool:
    """True while a spawned worker re-runs the main script (one without a ``__main__`` guard) before its task."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _start_error() -> WorkerError:
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None) if getattr(main, "__spec__", None) is None else None
    if script:
        return WorkerError(
            f"the worker processes exit as soon as they start: {script} calls wbc_batch without "
            '`if __name__ == "__main__":` (worker processes re-run the script); put the call under that guard, '
            "or use RunnerOptions(workers=1). No row was written."
        )
    return WorkerError("the worker processes exit as soon as they start (out of memory? a model they cannot load?); no row was written")


class WorkerPool:
    """``n`` worker processes (spawned, so no thread state is forked) that are replaced when one dies."""

    def __init__(self, n: int, model: Model, provider: str, threads: int, task: Callable[[Sequence[str]], BatchResult] = work) -> None:
        self.n, self.task = n, task
        self.data = model.data or model.path.read_bytes()  # a Model built by hand may not carry its bytes
        self.spec = (str(model.path), provider, threads, os.getpid())
        self.ctx = multiprocessing.get_context("spawn")
        self.restarts = 0
        self.executor, self.models = self._new()

    def _new(self) -> tuple[ProcessPoolExecutor, Queue]:
        """A new executor, and a queue holding one copy of the model's bytes per worker.

        Why a queue, not the initializer's arguments: those travel in the spawn pipe, which the parent writes
        before the worker has re-run the main script; a model larger than the pipe's buffer then blocked the
        parent for good when the worker exited during that re-run (a script without a ``__main__`` guard).
        A queue is written by a background thread, so a worker that never reads it blocks nothing.
        """
        models = self.ctx.Queue()
        for _ in range(self.n):  # a broken executor is replaced whole (restart), never topped up
            models.put(self.data)
        executor = ProcessPoolExecutor(self.n, mp_context=self.ctx, initializer=_init_worker, initargs=(models, *self.spec))
        return executor, models

    def start(self) -> None:
        """Wait for a first worker to be ready (or raise :class:`WorkerError` when none can start)."""
        try:
            self.executor.submit(self.task, []).result()
        except BrokenProcessPool:
            self.close(kill=True)
            raise _start_error() from None

    def submit(self, paths: Sequence[str]) -> Future:
        """The batch's future; a pool that broke while idle gives a future that says so (handled like a crash in flight)."""
        try:
            return self.executor.submit(self.task, list(paths))
        except BrokenProcessPool as e:
            fut: Future = Future()
            fut.set_exception(e)
            return fut

    def restart(self) -> None:
        """Replace every worker (the futures of the old ones fail with BrokenProcessPool)."""
        _end(self.executor, self.models)
        self.restarts += 1
        self.executor, self.models = self._new()

    def close(self, kill: bool = False) -> None:
        """Let the workers finish and exit, or (``kill``) end them now: an interrupted run does not wait on a batch."""
        if kill:
            _end(self.executor, self.models)
        else:
            self.executor.shutdown(wait=True)
            _drop(self.models)


def _drop(models: Queue) -> None:
    """Close the model queue without waiting for copies no worker took (else the interpreter's exit waits on them)."""
    models.cancel_join_thread()
    models.close()


def _end(executor: ProcessPoolExecutor, models: Queue) -> None:
    """Stop ``executor`` without waiting for its tasks: cancel the queue, terminate the workers, reap them."""
    _drop(models)
    procs = list((getattr(executor, "_processes", None) or {}).values())  # Python 3.14 has terminate_workers()
    executor.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            p.terminate()
        except (OSError, ValueError, AttributeError):  # already gone or closed
            pass
    for p in procs:
        try:
            p.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass
