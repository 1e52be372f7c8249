"""The local engine: batches are decoded and classified by worker processes on this machine.

Parallelism is by process: each worker decodes its batch *and* runs its own single-threaded
onnxruntime session on it, so only paths go in and a few floats per image come back (no
pixels cross a process boundary), and N workers keep N cores busy with no oversubscription.
At most ``2 * workers`` batches are in flight, so memory stays flat however many files
there are. The workers themselves (start, replace, end) are :mod:`wbc_batch.inference.pool`'s.
``workers=1`` (the default on a one-core machine) is one worker process too, not this process:
a file that crashes the decoder must cost its row, not the run (and every ``--resume`` after it).
Only ``RunnerOptions(in_process=True)``, for library callers, runs batches here, without that isolation.

What a worker death means for the rows: when the pool breaks (a decoder crash, the OOM
killer; in flight or while idle between batches) every batch it held fails alike, so none of
them is blamed outright. The pool is replaced, the oldest failed batch is rerun *alone* (the
only task in the pool): if it passes, it was innocent; if it kills its worker again, it is rerun
file by file, and a file that kills a worker twice on its own is the culprit, the one error row.
The other batches are sent again. Workers that keep dying file after file are not a bad file
but a broken setup: the run stops with :class:`~wbc_batch.inference.pool.WorkerError`. That policy is
:mod:`wbc_batch.inference.isolation`'s, shared with the Ray engine; this module says how to rerun files alone.

This module executes; :mod:`wbc_batch.inference.orchestrator` decides what a run does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .discover import InputFile
from .engine import RunnerOptions, available_cores, chunks, run_batch
from .isolation import Crashed, CrashIsolation
from .model import Model
from .pool import WorkerError, WorkerPool, exit_if_bootstrapping, work
from .rows import BatchResult, Prediction, TruthFn, to_predictions

__all__ = ["LocalEngine", "RunnerOptions", "available_cores"]  # the last two: their long-standing import path


class LocalEngine:
    """Runs batches in a pool of worker processes (one or more), or in this process when ``options.in_process``.

    ``task`` is what a worker runs on a batch (tests pass one that dies on a chosen file).
    """

    def __init__(self, task: Callable[[Sequence[str]], BatchResult] = work) -> None:
        self._pool: WorkerPool | None = None
        self._task = task

    def info(self) -> dict[str, Any]:
        return {"name": "local"}

    def close(self) -> None:
        """End the workers now (an interrupted or failed run does not wait on their batches)."""
        if self._pool is not None:
            self._pool.close(kill=True)
            self._pool = None

    def batches(self, files: Iterable[InputFile], model: Model, options: RunnerOptions, truth: TruthFn) -> Generator[list[Prediction], None, None]:
        """Predictions for ``files`` in input order, a batch at a time (the unit the CSV is flushed in)."""
        labels = model.labels
        batches = chunks(files, max(1, options.batch_size))
        workers = options.resolved_workers()
        if options.in_process:
            for batch in batches:
                yield to_predictions(batch, run_batch(model, [f.path for f in batch]), labels, truth)
            return
        exit_if_bootstrapping()  # a worker re-running a script without a __main__ guard starts no workers of its own
        pool = self._pool = WorkerPool(workers, model, options.provider, options.session_threads(), self._task)
        try:
            pool.start()
            sched = _Scheduler(pool, labels, truth)
            for batch in batches:
                sched.submit(batch)
                while len(sched.pending) >= 2 * workers:
                    yield sched.finish()
            while sched.pending:
                yield sched.finish()
        except BaseException:
            self.close()
            raise
        pool.close()
        self._pool = None


class _Scheduler:
    """The batches in flight, in input order, and what a broken pool means for each of them (see :mod:`.isolation`)."""

    def __init__(self, pool: WorkerPool, labels: Sequence[str], truth: TruthFn) -> None:
        self.pool, self.labels, self.truth = pool, labels, truth
        self.pending: deque[tuple[list[InputFile], Future]] = deque()
        self.crashes = CrashIsolation(labels, truth, _broken_setup)

    def submit(self, batch: list[InputFile]) -> None:
        self.pending.append((batch, self.pool.submit([f.path for f in batch])))

    def finish(self) -> list[Prediction]:
        """The rows of the oldest batch; after a crash, found by rerunning it in isolation."""
        batch, fut = self.pending.popleft()
        try:
            result = fut.result()
        except BrokenProcessPool:
            self.pool.restart()  # every batch still pending died with the old workers
            preds = [p for rows in self.crashes.isolate(batch, self._alone) for p in rows]
            for i, (b, _) in enumerate(self.pending):
                self.pending[i] = (b, self.pool.submit([f.path for f in b]))
            return preds
        self.crashes.passed()
        return to_predictions(batch, result, self.labels, self.truth)

    def _alone(self, files: Sequence[InputFile]) -> Iterator[list[Prediction]]:
        """``files`` as the only task in the pool (a fresh pool after each death); :class:`Crashed` when a worker died on it.

        A lone file gets a second chance: a worker killed from outside (the OOM killer) while it held a
        healthy file is not that file's fault.
        """
        for _ in range(2 if len(files) == 1 else 1):
            try:
                result = self.pool.submit([f.path for f in files]).result()
            except BrokenProcessPool:
                self.pool.restart()
                continue
            yield to_predictions(files, result, self.labels, self.truth)
            return
        raise Crashed()


def _broken_setup(f: InputFile, crashes: int, cause: BaseException | None) -> WorkerError:
    return WorkerError(
        f"worker processes died on {crashes} files in a row, each on its own (last: {f.rel}): "
        "that is a broken setup (out of memory?), not bad files; rows written so far are kept, "
        "fix the cause and rerun with --resume --retry-errors"
    )
