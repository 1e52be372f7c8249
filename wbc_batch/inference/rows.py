"""The row type every engine produces: one :class:`Prediction` per input file.

Why a module of its own: engines build rows, the orchestrator writes them, reports read them.
Keeping the type here means an engine imports neither the CSV writer (``predictions``) nor the
source of true labels (``truth``); the orchestrator hands the engine a truth function instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .discover import InputFile

STATUS_OK = "ok"
STATUS_ERROR = "error"

#: Gives the true label of a file from its run-relative path ('' when unknown).
TruthFn = Callable[[str], str]


@dataclass
class Prediction:
    """One input file's outcome: a label with probabilities, or an error."""

    path: str  # relative to the run root, POSIX separators
    label: str = ""
    confidence: float | None = None
    probabilities: Sequence[float] | None = None
    true_label: str = ""
    status: str = STATUS_OK
    error: str = ""


@dataclass
class BatchResult:
    """What one executed batch gives back: probabilities for the files that decoded, an error for the rest."""

    probabilities: np.ndarray  # (n_ok, C) float32
    errors: list[str | None]  # per input file: None = decoded (its row is the next in probabilities)


def to_predictions(batch: Sequence[InputFile], result: BatchResult, labels: Sequence[str], truth: TruthFn) -> list[Prediction]:
    """One row per file of ``batch``, in order: the most probable label, or the file's error."""
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
