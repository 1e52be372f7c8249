"""What an engine is: the interface the orchestrator drives, and the one unit of work every engine executes.

The orchestrator (:mod:`wbc_batch.inference.orchestrator`) decides *what* a run does: which
files, which output, --resume, true labels, progress, the summary. An engine only decides
*where* batches are decoded and classified: worker processes on this machine
(:class:`wbc_batch.inference.local_engine.LocalEngine`) or Ray actors
(:class:`wbc_batch.inference.ray_engine.RayEngine`). Both run :func:`run_batch` on each batch,
so both give the same probabilities, and both turn its answer into rows with
:func:`wbc_batch.inference.rows.to_predictions` and the truth function they were handed.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .discover import InputFile
from .model import Model
from .preprocess import ImageError, PreprocessSpec, load_image
from .rows import BatchResult, Prediction, TruthFn


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunnerOptions:
    """How to run: parallelism and the onnxruntime provider."""

    workers: int = 0  # processes (or Ray actors); 0 = all cores
    batch_size: int = 32
    provider: str = "cpu"
    threads: int = 0  # onnxruntime threads per session; 0 = cores / workers
    #: Decode and infer in the calling process instead of worker processes (``workers`` is then ignored):
    #: no worker start-up and no ``__main__`` guard needed in a script, but no crash isolation either, so a
    #: file that crashes the decoder (a segfault) ends the run. The local engine only; the CLI never does it.
    in_process: bool = False

    def resolved_workers(self) -> int:
        if self.in_process:
            return 1
        return self.workers if self.workers > 0 else available_cores()

    def session_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        return max(1, available_cores() // self.resolved_workers())


@runtime_checkable
class Engine(Protocol):
    """Executes the batches of a run; the orchestrator owns everything else."""

    def batches(self, files: Iterable[InputFile], model: Model, options: RunnerOptions, truth: TruthFn) -> Generator[list[Prediction], None, None]:
        """Rows for ``files`` in input order, a list per batch (the unit the CSV is flushed in).

        Closing the generator early stops the work in flight.
        """
        ...

    def info(self) -> dict[str, Any]:
        """A JSON-able description of where the run executed, for the run's sidecar."""
        ...

    def close(self) -> None:
        """Release what the engine still holds (worker processes, a Ray it started); safe to call twice."""
        ...


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
    if not n:
        probs = np.zeros((0, len(model.labels)), np.float32)
        scores = None if model.metadata.domain is None else np.zeros(0, np.float32)
    else:
        probs, scores = model.infer(buf[:n])
    return BatchResult(probs, errors, worker_values(model, probs, scores))


def worker_values(model: Model, probs: np.ndarray, scores: np.ndarray | None) -> dict[str, np.ndarray]:
    """What a worker computes per decoded file beside its probabilities (``probs``, ``(n, C)``) and the network's
    out-of-domain ``scores``, by name, each ``(n,)``. Each is a CSV column (:data:`wbc_batch.inference.predictions.COLUMNS`)
    and reaches the rows of every engine unchanged (:attr:`BatchResult.values`); an empty batch gives empty arrays."""
    domain = model.metadata.domain
    if scores is None or domain is None:
        return {}
    return {"ood_score": scores, "in_domain": scores <= domain.threshold}


def chunks(files: Iterable[InputFile], size: int) -> Iterator[list[InputFile]]:
    it = iter(files)
    while batch := list(islice(it, size)):
        yield batch
