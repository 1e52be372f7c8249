"""Classification metrics from label arrays, with the class list taken from the model.

Pure numpy, so the inference side needs no scikit-learn (the tests cross-check against it).
A class with no samples still appears, with zero support and no division errors: its
precision/recall/F1 are 0, as scikit-learn reports with ``zero_division=0``. Macro averages are
over the classes the truth holds (scikit-learn's ``labels=`` those classes): an 8-class model scored
on a 4-class truth set is averaged over those 4, and a prediction of another class still counts as
wrong (it is a miss of the true class), so the figure compares with a 4-class model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Metrics:
    labels: tuple[str, ...]
    n: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    per_class: tuple[ClassMetrics, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]  # rows: true, columns: predicted
    macro_over: tuple[str, ...] = ()  # the classes the macro averages are over: those with support (all when none has)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["macro_over"] = list(self.macro_over)
        d["per_class"] = {c.label: {k: v for k, v in asdict(c).items() if k != "label"} for c in self.per_class}
        d["confusion_matrix"] = [list(r) for r in self.confusion_matrix]
        d["confusion_matrix_normalized"] = normalize_rows(np.asarray(self.confusion_matrix)).round(6).tolist()
        return d


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class index, columns = predicted class index."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds class indices outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b != 0)


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Row-normalised matrix (each true class sums to 1; an empty row stays 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    return _div(cm, cm.sum(axis=1, keepdims=True) + np.zeros_like(cm))


def metrics_from_confusion(cm: np.ndarray, labels: Sequence[str]) -> Metrics:
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _div(tp, predicted)
    recall = _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    n = int(cm.sum())
    w = support / n if n else np.zeros_like(support)
    present = support > 0 if n else np.ones_like(support, dtype=bool)
    per_class = tuple(
        ClassMetrics(lb, float(precision[i]), float(recall[i]), float(f1[i]), int(support[i])) for i, lb in enumerate(labels)
    )
    return Metrics(
        labels=tuple(labels),
        n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_precision=float(precision[present].mean()),
        macro_recall=float(recall[present].mean()),
        macro_f1=float(f1[present].mean()),
        weighted_precision=float((precision * w).sum()),
        weighted_recall=float((recall * w).sum()),
        weighted_f1=float((f1 * w).sum()),
        per_class=per_class,
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in cm),
        macro_over=tuple(lb for lb, k in zip(labels, present, strict=True) if k),
    )


def compute_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]) -> Metrics:
    """All figures from integer class indices into ``labels``."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, len(labels)), labels)


def compute_metrics_from_names(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> Metrics:
    """As :func:`compute_metrics`, from label names (unknown names are an error)."""
    index = {lb: i for i, lb in enumerate(labels)}
    try:
        t = [index[x] for x in y_true]
        p = [index[x] for x in y_pred]
    except KeyError as e:
        raise ValueError(f"label {e.args[0]!r} is not one of the model's labels {list(labels)}") from None
    return compute_metrics(t, p, labels)
