"""The local engine: batches are decoded and classified by worker processes on this machine.

Parallelism is by process: each worker decodes its batch *and* runs its own single-threaded
onnxruntime session on it, so only paths go in and a few floats per image come back (no
pixels cross a process boundary), and N workers keep N cores busy with no oversubscription.
At most ``2 * workers`` batches are in flight, so memory stays flat however many files
there are. A worker that dies (a decoder crash, the OOM killer) is replaced, and the batch
it held is rerun file by file so only the culprit becomes an error row.

This module executes; :mod:`wbc_batch.inference.orchestrator` decides what a run does.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from .discover import InputFile
from .engine import RunnerOptions, available_cores, chunks, run_batch
from .model import Model, load_model
from .rows import BatchResult, Prediction, TruthFn, to_predictions

__all__ = ["LocalEngine", "RunnerOptions", "available_cores"]  # the last two: their long-standing import path

# -- worker processes -------------------------------------------------------------------
_worker_model: Model | None = None  # one per worker process, set by its initializer


def _init_worker(model_path: str, provider: str, threads: int) -> None:
    global _worker_model
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker_model = load_model(model_path, provider=provider, threads=threads, spinning=False)


def _work(paths: Sequence[str]) -> BatchResult:
    assert _worker_model is not None
    return run_batch(_worker_model, paths)


class _Pool:
    """A process pool that can be replaced when a worker dies."""

    def __init__(self, n: int, init_args: tuple) -> None:
        self.n, self.init_args = n, init_args
        self.ctx = multiprocessing.get_context("spawn")
        self.pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.n, mp_context=self.ctx, initializer=_init_worker, initargs=self.init_args)

    def submit(self, paths: Sequence[str]) -> Future:
        return self.pool.submit(_work, list(paths))

    def restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new()

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class LocalEngine:
    """Runs batches in this process (``workers=1``) or in a pool of worker processes."""

    def __init__(self) -> None:
        self._pool: _Pool | None = None

    def info(self) -> dict[str, Any]:
        return {"name": "local"}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close(cancel=True)
            self._pool = None

    def batches(self, files: Iterable[InputFile], model: Model, options: RunnerOptions, truth: TruthFn) -> Generator[list[Prediction], None, None]:
        """Predictions for ``files`` in input order, a batch at a time (the unit the CSV is flushed in)."""
        labels = model.labels
        batches = chunks(files, max(1, options.batch_size))
        workers = options.resolved_workers()
        if workers <= 1:
            for batch in batches:
                yield to_predictions(batch, run_batch(model, [f.path for f in batch]), labels, truth)
            return

        pool = self._pool = _Pool(workers, (str(model.path), options.provider, options.session_threads()))
        pending: deque[tuple[list[InputFile], Future]] = deque()
        window = 2 * workers
        try:
            for batch in batches:
                pending.append((batch, pool.submit([f.path for f in batch])))
                while len(pending) >= window:
                    yield _finish(pending, pool, labels, truth)
            while pending:
                yield _finish(pending, pool, labels, truth)
        except BaseException:
            self.close()
            raise
        pool.close()
        self._pool = None


def _finish(pending: deque, pool: _Pool, labels: Sequence[str], truth: TruthFn) -> list[Prediction]:
    batch, fut = pending.popleft()
    try:
        return to_predictions(batch, fut.result(), labels, truth)
    except BrokenProcessPool:
        pass
    # A worker died while the pool held this batch: find the file that kills it, one at a time.
    pool.restart()
    preds: list[Prediction] = []
    for f in batch:
        try:
            res = pool.submit([f.path]).result()
        except BrokenProcessPool:
            pool.restart()
            res = BatchResult(np.zeros((0, len(labels)), np.float32), ["the decoding worker crashed on this file"])
        preds.extend(to_predictions([f], res, labels, truth))
    # Batches queued behind it died with the old pool: send them again.
    for i, (b, _) in enumerate(pending):
        pending[i] = (b, pool.submit([f.path for f in b]))
    return preds


def __getattr__(name: str) -> Any:
    """``classify`` moved to the orchestrator (it picks the truth function); its old import path still works."""
    if name == "classify":
        from .orchestrator import classify

        return classify
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
