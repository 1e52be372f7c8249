"""The row type every engine produces: one :class:`Prediction` per input file.

Why a module of its own: engines build rows, the orchestrator writes them, reports read them.
Keeping the type here means an engine imports neither the CSV writer (``predictions``) nor the
source of true labels (``truth``); the orchestrator hands the engine a truth function instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .discover import InputFile

STATUS_OK = "ok"
STATUS_ERROR = "error"

#: Share of a run's classified images out of domain above which the summary and the report warn.
#: Why 10%: the threshold passes 99.5% of held-out in-domain images, so a run like the training data
#: has well under 1% flagged; a tenth means a real part of the run is unlike it (another lab's stain,
#: scanner or magnification, or not cells at all).
OUT_OF_DOMAIN_WARN_SHARE = 0.10

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
    #: With a model that carries a domain check: its score (higher = less like the training data) and
    #: whether it is within the model's threshold. None for a model without one, and for error rows.
    ood_score: float | None = None
    in_domain: bool | None = None
    #: Any other value the worker computed for the file (:attr:`BatchResult.values`), by name; empty for error rows.
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def risk(self) -> float | None:
        """How likely the label is wrong, for ranking a review queue (higher first); None for an error row. See :func:`risk`."""
        return None if self.confidence is None else risk(self.confidence)


def risk(confidence: float) -> float:
    """``1 - confidence``: the model's calibrated chance of error when it carries calibration.

    Why out-of-domain rows are not put first: measured on images from other labs (pbc/test and
    wbc-tecom, never the test set), flagged rows are wrong more often (pbc/test: accuracy 0.69 vs
    0.87 in domain), but ranking them first caught no more errors in the 10% or 30% reviewed
    (0.204 vs 0.204 and 0.525 vs 0.518 on pbc/test; 0.137 vs 0.144 when its other classes count
    as errors). The domain check is the run-level signal instead (the warning, the in_domain column).
    """
    return 1.0 - confidence


#: Prediction's own attributes for worker values (the rest go to Prediction.values).
_ATTRIBUTES = frozenset({"ood_score", "in_domain"})


@dataclass
class BatchResult:
    """What one executed batch gives back: probabilities for the files that decoded, an error for the rest."""

    probabilities: np.ndarray  # (n_ok, C) float32
    errors: list[str | None]  # per input file: None = decoded (its row is the next in probabilities)
    #: What the worker computed per decoded file besides the probabilities, by name, each ``(n_ok,)``: the
    #: domain check's ``ood_score`` and ``in_domain`` (a model with one). The same names for every batch of
    #: a model, whether or not a file decoded, so that the batches of a run stack (Ray Data's blocks).
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def failed(cls, errors: Sequence[str], n_labels: int) -> BatchResult:
        """A batch none of whose files has a row of probabilities: each file's error."""
        return cls(np.zeros((0, n_labels), np.float32), list(errors))

    def padded(self) -> dict[str, np.ndarray]:
        """Per input file, in order: ``ok``, ``probs`` (zeros where it failed), ``error`` ('' where it decoded), and
        each value (zero where it failed). Why: a file-aligned form can be cut and re-sequenced (Ray returns batches in pieces)."""
        ok = np.array([e is None for e in self.errors], bool)
        out = {"ok": ok, "probs": _spread(self.probabilities, ok), "error": np.array([e or "" for e in self.errors], object)}
        return out | {_VALUE + name: _spread(v, ok) for name, v in self.values.items()}

    @classmethod
    def from_padded(cls, cols: dict[str, np.ndarray]) -> BatchResult:
        """The inverse of :meth:`padded` (for files that may come from several batches)."""
        ok = np.asarray(cols["ok"], bool)
        errors: list[str | None] = [None if k else str(e) for k, e in zip(ok, cols["error"], strict=True)]
        values = {name[len(_VALUE) :]: np.asarray(v)[ok] for name, v in cols.items() if name.startswith(_VALUE)}
        return cls(np.asarray(cols["probs"], np.float32)[ok], errors, values)


_VALUE = "value_"  # the padded form's prefix of a value's name


def _spread(rows: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``rows`` (one per decoded file) placed at the ``ok`` files of the batch, zeros elsewhere."""
    out = np.zeros((len(ok), *rows.shape[1:]), rows.dtype)
    out[ok] = rows
    return out


def to_predictions(batch: Sequence[InputFile], result: BatchResult, labels: Sequence[str], truth: TruthFn) -> list[Prediction]:
    """One row per file of ``batch``, in order: the most probable label, or the file's error. Every engine's rows come from here."""
    out: list[Prediction] = []
    k = 0
    probs = result.probabilities
    best = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    for f, err in zip(batch, result.errors, strict=True):
        t = truth(f.rel)
        if err is not None:
            out.append(Prediction(f.rel, "", None, None, t, STATUS_ERROR, err))
            continue
        row = probs[k]
        i = int(best[k])
        p = Prediction(f.rel, labels[i], float(row[i]), row.tolist(), t, STATUS_OK, "")
        for name, v in result.values.items():
            if name in _ATTRIBUTES:
                setattr(p, name, v[k].item())
            else:
                p.values[name] = v[k].item()
        out.append(p)
        k += 1
    return out


def domain_warning(out_of_domain: int, checked: int, share: float = OUT_OF_DOMAIN_WARN_SHARE) -> str | None:
    """What to tell a lab when more than ``share`` of ``checked`` images are out of domain (None otherwise)."""
    if checked <= 0 or out_of_domain / checked <= share:
        return None
    return (
        f"{out_of_domain} of {checked} images ({100 * out_of_domain / checked:.0f}%) are out of domain (unlike the model's "
        f"training data; over {100 * share:.0f}%): do not trust this run's counts as they are. Look at them (in_domain=false in "
        "the CSV); if they are cells from your own lab, fine-tune on a few hundred labelled images of your own "
        "(wbc-batch train DIR --init MODEL, then wbc-batch export, which fits a new domain check on them); refitting the "
        "check alone would hide the problem, not fix it"
    )
