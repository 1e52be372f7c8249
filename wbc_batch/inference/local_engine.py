"""Batch classification: files stream in, batches are decoded and run in parallel, predictions stream out.

Parallelism is by process: each worker decodes its batch *and* runs its own single-threaded
onnxruntime session on it, so only paths go in and a few floats per image come back (no
pixels cross a process boundary), and N workers keep N cores busy with no oversubscription.
At most ``2 * workers`` batches are in flight, so memory stays flat however many files
there are. A worker that dies (a decoder crash, the OOM killer) is replaced, and the batch
it held is rerun file by file so only the culprit becomes an error row.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice

import numpy as np

from .discover import InputFile, common_root, iter_images
from .model import Model, load_model
from .predictions import STATUS_ERROR, STATUS_OK, Prediction
from .preprocess import ImageError, PreprocessSpec, load_image
from .truth import folder_truth


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunnerOptions:
    """How to run: parallelism and the onnxruntime provider."""

    workers: int = 0  # processes; 0 = all cores; 1 = in this process
    batch_size: int = 32
    provider: str = "cpu"
    threads: int = 0  # onnxruntime threads per session; 0 = cores / workers

    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else available_cores()

    def session_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        return max(1, available_cores() // self.resolved_workers())


@dataclass
class BatchResult:
    """What a worker sends back: probabilities for the files that decoded, an error for the rest."""

    probabilities: np.ndarray  # (n_ok, C) float32
    errors: list[str | None]  # per input file: None = decoded (its row is the next in probabilities)


def run_batch(model: Model, paths: Sequence[str]) -> BatchResult:
    """Decode ``paths`` into one preallocated batch and run the network once on it."""
    spec: PreprocessSpec = model.metadata.preprocess
    buf = np.empty((len(paths), spec.height, spec.width, 3), dtype=np.uint8)
    errors: list[str | None] = []
    n = 0
    for p in paths:
        try:
            buf[n] = load_image(p, spec)
            n += 1
            errors.append(None)
        except ImageError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - a decoder bug must cost one row, not the run
            errors.append(f"decoder failed: {type(e).__name__}: {e}")
    probs = model.predict(buf[:n]) if n else np.zeros((0, len(model.labels)), np.float32)
    return BatchResult(probs, errors)


# -- worker processes -------------------------------------------------------------------
_worker_model: Model | None = None  # one per worker process, set by its initializer


def _init_worker(model_path: str, provider: str, threads: int) -> None:
    global _worker_model
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker_model = load_model(model_path, provider=provider, threads=threads, spinning=False)


def _work(paths: Sequence[str]) -> BatchResult:
    assert _worker_model is not None
    return run_batch(_worker_model, paths)


def to_predictions(batch: Sequence[InputFile], result: BatchResult, labels: Sequence[str], truth: Callable[[str], str]) -> list[Prediction]:
    out: list[Prediction] = []
    k = 0
    probs = result.probabilities
    best = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    for f, err in zip(batch, result.errors, strict=True):
        t = truth(f.rel)
        if err is None:
            row = probs[k]
            i = int(best[k])
            out.append(Prediction(f.rel, labels[i], float(row[i]), row.tolist(), t, STATUS_OK, ""))
            k += 1
        else:
            out.append(Prediction(f.rel, "", None, None, t, STATUS_ERROR, err))
    return out


def chunks(files: Iterable[InputFile], size: int) -> Iterator[list[InputFile]]:
    it = iter(files)
    while batch := list(islice(it, size)):
        yield batch


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


def iter_prediction_batches(
    files: Iterable[InputFile],
    model: Model,
    options: RunnerOptions = RunnerOptions(),
    truth: Callable[[str], str] | None = None,
) -> Iterator[list[Prediction]]:
    """Predictions for ``files`` in input order, a batch at a time (the unit the CSV is flushed in)."""
    labels = model.labels
    truth_fn = truth or (lambda rel: folder_truth(rel, labels))
    batches = chunks(files, max(1, options.batch_size))
    workers = options.resolved_workers()
    if workers <= 1:
        for batch in batches:
            yield to_predictions(batch, run_batch(model, [f.path for f in batch]), labels, truth_fn)
        return

    pool = _Pool(workers, (str(model.path), options.provider, options.session_threads()))
    pending: deque[tuple[list[InputFile], Future]] = deque()
    window = 2 * workers
    try:
        for batch in batches:
            pending.append((batch, pool.submit([f.path for f in batch])))
            while len(pending) >= window:
                yield _finish(pending, pool, labels, truth_fn)
        while pending:
            yield _finish(pending, pool, labels, truth_fn)
    except BaseException:
        pool.close(cancel=True)
        raise
    pool.close()


def _finish(pending: deque, pool: _Pool, labels: Sequence[str], truth: Callable[[str], str]) -> list[Prediction]:
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


def classify(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    model: Model | str | os.PathLike[str] | None = None,
    *,
    options: RunnerOptions = RunnerOptions(),
    truth: Callable[[str], str] | None = None,
) -> Iterator[Prediction]:
    """Classify every image under ``inputs``; yields one :class:`Prediction` per file, in order.

    ``inputs`` is a list of folders and files, or a single one. ``model`` is a loaded
    :class:`Model`, a path, or None for the shipped default model. Paths in the results are
    relative to the inputs' common root.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a bare "folder" would otherwise be walked letter by letter
    inputs = list(inputs)
    if not isinstance(model, Model):
        model = load_model(model, provider=options.provider, threads=options.session_threads())
    files = iter_images(inputs, common_root(inputs))
    for batch in iter_prediction_batches(files, model, options, truth):
        yield from batch
