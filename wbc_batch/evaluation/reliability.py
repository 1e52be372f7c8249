"""How far a run's confidence can be trusted: calibration (ECE, reliability bins) and risk-coverage.

Pure numpy on per-image confidences and correctness, so the report, the export and the tests share
one definition. ECE uses equal-width bins over (0, 1], weighted by the share of images in each bin
(Guo et al. 2017); scikit-learn has no ECE, so it is written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    confidence: float  # mean confidence of the bin's images (nan when empty)
    accuracy: float  # share correct (nan when empty)


@dataclass(frozen=True)
class CoveragePoint:
    review_share: float  # share of images sent to review (the riskiest first)
    caught: float  # share of all errors that are among them
    accepted_accuracy: float  # accuracy among the images not sent to review (nan when none remain)


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> list[ReliabilityBin]:
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        bins.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), n,
                                   float(c[m].mean()) if n else float("nan"), float(ok[m].mean()) if n else float("nan")))
    return bins


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> float:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of images (0 for no images)."""
    bins = reliability_bins(confidence, correct, n_bins)
    total = sum(b.count for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins if b.count))


def review_order(risk: Sequence[float]) -> np.ndarray:
    """Indices from most to least likely wrong; ties keep input order, so the queue is reproducible."""
    return np.argsort(-np.asarray(risk, dtype=np.float64), kind="stable")


def review_count(n: int, share: float) -> int:
    """How many of ``n`` images "the ``share`` riskiest" is: rounded up, so a small run with a share above 0 reviews at least one."""
    return min(n, int(np.ceil(share * n - 1e-9))) if share > 0 else 0


def coverage_point(risk: Sequence[float], correct: Sequence[bool], share: float) -> CoveragePoint:
    """What sending the ``share`` riskiest images to review buys: errors caught, accuracy of the rest."""
    ok = np.asarray(correct, dtype=bool)
    order = review_order(risk)
    k = review_count(len(ok), share)
    errors = int((~ok).sum())
    caught = int((~ok[order[:k]]).sum())
    rest = ok[order[k:]]
    return CoveragePoint(share, caught / errors if errors else float("nan"), float(rest.mean()) if len(rest) else float("nan"))


def risk_coverage(risk: Sequence[float], correct: Sequence[bool], shares: Sequence[float] | None = None) -> list[CoveragePoint]:
    shares = np.linspace(0.0, 1.0, 21) if shares is None else shares
    return [coverage_point(risk, correct, float(s)) for s in shares]


def share_for_accuracy(risk: Sequence[float], correct: Sequence[bool], target: float) -> float:
    """The smallest review share whose accepted images reach ``target`` accuracy (1.0 if none does)."""
    ok = np.asarray(correct, dtype=bool)[review_order(risk)]
    n = len(ok)
    if n == 0:
        return 0.0
    # accuracy of the accepted tail ok[k:] for every k, from the suffix sums
    suffix_correct = np.concatenate([np.cumsum(ok[::-1])[::-1], [0]])
    remaining = n - np.arange(n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(remaining > 0, suffix_correct / np.maximum(remaining, 1), 1.0)
    k = int(np.argmax(acc >= target))
    return k / n
