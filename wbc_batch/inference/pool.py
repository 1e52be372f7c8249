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
  without a ``__main__`` guard, a model they cannot load) are an error before any row is written. The
  error is what the workers said: their stderr goes through a pipe that this process copies to its own
  stderr, keeping the last bytes, and their exit codes are kept. A missing guard is named only when a
  worker wrote that it re-ran a script that starts a run (:func:`exit_if_bootstrapping`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.spawn
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.popen_spawn_posix import Popen as SpawnPopen
from multiprocessing.queues import Queue
from typing import Any

from ..errors import ExitCode, WbcBatchError
from .engine import run_batch
from .model import Model, model_from_bytes
from .rows import BatchResult

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WATCHDOG_S = 1.0
_MODEL_WAIT_S = 600.0  # a worker waits this long for its copy of the model (the parent writes it at once)
_TAIL_BYTES = 4096  # of the workers' stderr, kept to explain workers that exit as soon as they start
_SAID_CHARS = 300

#: What a worker writes on its stderr when it finds itself re-running a main script that starts a run when
#: imported (no ``__main__`` guard): the parent reads it there, so it blames the guard only when that is the cause.
UNGUARDED_MAIN = "wbc-batch worker: the main script started a run when this worker process re-ran it"

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


def exit_if_bootstrapping() -> None:
    """In a worker re-running an unguarded main script: say so where the parent reads it, and exit (no workers of its own)."""
    if is_spawned_worker_bootstrapping():
        sys.stderr.write(UNGUARDED_MAIN + "\n")
        sys.stderr.flush()
        raise SystemExit(1)


def _start_error(exit_codes: Sequence[int], said: str) -> WorkerError:
    """Why no worker started: a missing guard when a worker said so; else their exit code and last line on stderr."""
    if UNGUARDED_MAIN in said:
        script = getattr(sys.modules.get("__main__"), "__file__", None) or "the main script"
        return WorkerError(
            f"the worker processes exit as soon as they start: {script} starts a run when it is imported, and worker "
            'processes re-run it; put the call under `if __name__ == "__main__":`, or use RunnerOptions(in_process=True). '
            "No row was written."
        )
    own = [c for c in exit_codes if c != -signal.SIGTERM]  # the others were ended by the pool once one had died
    facts = [f"exit code {_exit_name((own or list(exit_codes) or [None])[0])}"]
    exe = os.fsdecode(multiprocessing.spawn.get_executable())
    if not os.access(exe, os.X_OK):
        facts.append(f"the interpreter {exe} cannot be run by this user")
    last = next((ln.strip() for ln in reversed(said.splitlines()) if ln.strip()), "")
    facts.append(f"they said: {last[:_SAID_CHARS]}" if last else "they said nothing")
    return WorkerError(f"the worker processes exit as soon as they start ({'; '.join(facts)}); no row was written")


def _exit_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


class _StderrTap:
    """The workers' stderr: a pipe whose every byte a thread copies to this process's stderr, keeping the last ones.

    Why: workers that exit as soon as they start (a ``sitecustomize`` that ends them, a script they cannot
    re-run) are explained by what they wrote; an exit code alone says little, and their stderr is not ours to read.
    """

    def __init__(self) -> None:
        self.out = os.dup(2)  # where workers would have written; OSError when this process has no stderr
        self.read_fd, self.write_fd = os.pipe()
        self.tail = b""
        self.thread = threading.Thread(target=self._copy, daemon=True, name="wbc-batch-worker-stderr")
        self.thread.start()

    def _copy(self) -> None:
        try:
            while chunk := os.read(self.read_fd, 1 << 16):
                self.tail = (self.tail + chunk)[-_TAIL_BYTES:]
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(self.out, view) :]
                    except OSError:  # our stderr is gone: keep the tail, drop the copy
                        break
        finally:
            os.close(self.read_fd)
            os.close(self.out)

    def close(self, wait_s: float) -> str:
        """No more workers get the pipe; wait (up to ``wait_s``) for what the ended ones wrote. Returns the tail."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        self.thread.join(wait_s)
        return self.tail.decode(errors="replace")


class _TappedPopen(SpawnPopen):
    """Spawns a worker whose stderr is the pool's tap from its first byte (a ``sitecustomize`` runs before any code of ours).

    The spawn machinery hands a child this process's fd 2 and takes no other, so fd 2 points at the tap for
    the instant of the launch; whatever this process writes meanwhile goes through the tap to the same stderr.
    """

    def _launch(self, process_obj: Any) -> None:
        resource_tracker.ensure_running()  # started inside the window, it would hold the tap open for good
        saved = os.dup(2)
        try:
            os.dup2(process_obj.tap_fd, 2)
            super()._launch(process_obj)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _TappedProcess(SpawnProcess):
    tap_fd = -1

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # multiprocessing's name
        return _TappedPopen(process_obj) if process_obj.tap_fd >= 0 else SpawnProcess._Popen(process_obj)


class _WorkerContext(SpawnContext):
    """The spawn context, but the processes it starts write to the tap and are kept (their exit codes explain a failed start)."""

    def __init__(self, tap: _StderrTap | None) -> None:
        self.tap_fd = tap.write_fd if tap is not None and os.name == "posix" else -1
        self.started: list[_TappedProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> _TappedProcess:  # type: ignore[override]  # the name ProcessPoolExecutor calls
        p = _TappedProcess(*args, **kwargs)
        p.tap_fd = self.tap_fd
        self.started.append(p)
        return p

    def exit_codes(self) -> list[int]:
        return [c for p in self.started if (c := p.exitcode) is not None]


def _open_tap() -> _StderrTap | None:
    try:
        return _StderrTap()
    except OSError:  # no stderr to copy to (or no pipe): workers keep ours, and a failed start says less
        return None


class WorkerPool:
    """``n`` worker processes (spawned, so no thread state is forked) that are replaced when one dies."""

    def __init__(self, n: int, model: Model, provider: str, threads: int, task: Callable[[Sequence[str]], BatchResult] = work) -> None:
        self.n, self.task = n, task
        self.data = model.data or model.path.read_bytes()  # a Model built by hand may not carry its bytes
        self.spec = (str(model.path), provider, threads, os.getpid())
        self.tap = _open_tap()
        self.ctx: _WorkerContext  # set by _new: one per executor
        self.restarts = 0
        self.executor, self.models = self._new()

    def _new(self) -> tuple[ProcessPoolExecutor, Queue]:
        """A new executor, and a queue holding one copy of the model's bytes per worker.

        Why a queue, not the initializer's arguments: those travel in the spawn pipe, which the parent writes
        before the worker has re-run the main script; a model larger than the pipe's buffer then blocked the
        parent for good when the worker exited during that re-run (a script without a ``__main__`` guard).
        A queue is written by a background thread, so a worker that never reads it blocks nothing.
        """
        self.ctx = _WorkerContext(self.tap)  # a context per executor: its processes are the ones a failed start asks about
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
            said = self.close(kill=True, wait_s=5.0)
            raise _start_error(self.ctx.exit_codes(), said) from None
        except OSError as e:  # this process could not even spawn one (no memory to fork, no processes left)
            self.close(kill=True)
            raise WorkerError(f"cannot start worker processes: {e}; no row was written") from None

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
        _end(self.executor, self.models, self.ctx.started)
        self.restarts += 1
        self.executor, self.models = self._new()

    def close(self, kill: bool = False, wait_s: float = 1.0) -> str:
        """Let the workers finish and exit, or (``kill``) end them now: an interrupted run does not wait on a batch.

        Returns the last of what the workers wrote on stderr (waiting up to ``wait_s`` for it).
        """
        if kill:
            _end(self.executor, self.models, self.ctx.started)
        else:
            self.executor.shutdown(wait=True)
            _drop(self.models)
        return self.tap.close(wait_s) if self.tap is not None else ""


def _drop(models: Queue) -> None:
    """Close the model queue without waiting for copies no worker took (else the interpreter's exit waits on them)."""
    models.cancel_join_thread()
    models.close()


def _end(executor: ProcessPoolExecutor, models: Queue, procs: Sequence[SpawnProcess]) -> None:
    """Stop ``executor`` without waiting for its tasks: cancel the queue, terminate its workers (``procs``, every process
    its context started: the executor keeps its own list private), reap them."""
    _drop(models)
    manager = getattr(executor, "_executor_manager_thread", None)  # shutdown forgets it
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
    _wait_for_manager(manager, timeout=5)


def _wait_for_manager(thread: threading.Thread | None, timeout: float) -> None:
    """Wait (bounded) for the executor's manager thread, which reaps the same workers: until it has, a worker it reaped
    first reads as alive here (``waitpid`` fails in the second reaper; seen on 3.12 about once in 70 ends on a busy machine).

    Private attribute: the executor offers no bounded wait, and ``shutdown(wait=True)`` can block for good on a call
    queue whose reader was killed (CPython gh-94777 before 3.12).
    """
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)
