"""How far a run can be trusted, as report data: the review queue, calibration, risk-coverage and the domain check.

The review queue is the riskiest classified rows (``risk`` column of a model with a domain check,
else ``1 - confidence``), chosen one of three ways (:class:`ReviewPolicy`): a share the lab will
check (default 10%), the smallest share whose accepted rows reach a target accuracy (needs true
labels), or every row below a confidence threshold. ECE, the reliability bins and the
risk-coverage points come from :mod:`.reliability` (one definition for the report, the export and
the benches), over the rows with a true label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..inference.rows import OUT_OF_DOMAIN_WARN_SHARE, domain_warning
from .reliability import (
    CoveragePoint,
    ReliabilityBin,
    coverage_point,
    expected_calibration_error,
    reliability_bins,
    review_count,
    review_order,
    risk_coverage,
    share_for_accuracy,
)
from .report_scan import Scan

DEFAULT_REVIEW_SHARE = 0.10
#: The review shares the report's risk-coverage table lists (the curve uses 21 points from 0 to 1).
TABLE_SHARES = (0.05, 0.10, 0.15, 0.20, 0.30, 0.50)
NO_DOMAIN_NOTE = (
    "This model carries no domain check (its metadata has no 'domain' section), so images unlike its training data "
    "(another lab's stain or scanner, or no cell at all) are not flagged, the CSV has no risk, ood_score and in_domain "
    "columns, and the review queue is ranked by 1 - confidence. Add one with: wbc-batch calibrate MODEL "
    "--reference-dir TRAINING_DATA [--calibration-dir HELD_OUT] -o NEW_MODEL."
)


@dataclass(frozen=True)
class ReviewPolicy:
    """Which rows go to review: give at most one of ``share``, ``target_accuracy`` and ``threshold`` (none: 10%)."""

    share: float | None = None
    target_accuracy: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        given = [k for k, v in asdict(self).items() if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one way to choose the review queue, not {' and '.join(given)}")
        for k in given:
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{k} must be within [0, 1], got {getattr(self, k)}")


@dataclass
class TrustData:
    """The review queue and the trust figures of one run (the figures with truth need true labels)."""

    queue: np.ndarray  # indices into the scan's per-row arrays, riskiest first
    review: dict  # mode, asked, share, files (and with truth: caught, accepted_accuracy)
    domain: dict | None  # checked, out_of_domain, share, warn_share; None without a domain check
    risk_source: str
    calibration: dict | None  # the model's calibration section, from the run's sidecar (None: unknown/absent)
    ece: float | None = None
    bins: list[ReliabilityBin] = field(default_factory=list)
    curve: list[CoveragePoint] = field(default_factory=list)
    table: list[CoveragePoint] = field(default_factory=list)
    errors: int = 0  # wrong rows among those with a true label
    note: str | None = None

    def to_json(self) -> dict:
        return {
            "risk": self.risk_source,
            "review": self.review,
            "domain": self.domain,
            "calibration": self.calibration,
            "ece": self.ece,
            "reliability_bins": [asdict(b) for b in self.bins],
            "risk_coverage": [asdict(p) for p in self.curve],
            "note": self.note,
        }


def _truth_arrays(s: Scan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risk, confidence and correctness of the rows with a true label."""
    correct = np.frombuffer(s.correct, dtype=np.int8) if len(s.correct) else np.zeros(0, np.int8)
    known = correct >= 0
    return np.asarray(s.risk)[known], np.asarray(s.confidence)[known], correct[known] == 1


def review_queue(s: Scan, policy: ReviewPolicy, warn) -> tuple[np.ndarray, dict]:
    """The rows to review, riskiest first, and how they were chosen."""
    risk = np.asarray(s.risk)
    n = len(risk)
    order = review_order(risk)
    if policy.threshold is not None:
        low = np.asarray(s.confidence)[order] < policy.threshold
        return order[low], {"mode": "threshold", "asked": policy.threshold}
    if policy.target_accuracy is not None:
        t_risk, _, t_ok = _truth_arrays(s)
        if len(t_ok):
            share = share_for_accuracy(t_risk, t_ok, policy.target_accuracy)
            return order[: review_count(n, share)], {"mode": "target_accuracy", "asked": policy.target_accuracy}
        warn(f"--target-accuracy needs true labels and this CSV has none: the {DEFAULT_REVIEW_SHARE:.0%} riskiest are listed instead")
    share = DEFAULT_REVIEW_SHARE if policy.share is None else policy.share
    return order[: review_count(n, share)], {"mode": "share", "asked": share}


def _domain(s: Scan) -> dict | None:
    if not s.domain:
        return None
    inside = np.frombuffer(s.in_domain, dtype=np.int8) if len(s.in_domain) else np.zeros(0, np.int8)
    checked, out = int((inside >= 0).sum()), int((inside == 0).sum())
    return {"checked": checked, "out_of_domain": out, "share": out / checked if checked else 0.0, "warn_share": OUT_OF_DOMAIN_WARN_SHARE}


def build_trust(s: Scan, policy: ReviewPolicy, calibration: dict | None, warn) -> TrustData:
    """Everything the report says about trust; a run with many out-of-domain rows adds a warning."""
    queue, review = review_queue(s, policy, warn)
    n = len(s.risk)
    review.update(files=len(queue), share=len(queue) / n if n else 0.0)
    domain = _domain(s)
    if domain is not None and (msg := domain_warning(domain["out_of_domain"], domain["checked"])):
        warn(msg)
    t = TrustData(queue, review, domain, "the CSV's risk column" if s.domain else "1 - confidence", calibration,
                  note=None if s.domain else NO_DOMAIN_NOTE)
    t_risk, t_conf, t_ok = _truth_arrays(s)
    if len(t_ok):
        t.ece = expected_calibration_error(t_conf, t_ok)
        t.bins = reliability_bins(t_conf, t_ok)
        t.curve = risk_coverage(t_risk, t_ok)
        t.table = [coverage_point(t_risk, t_ok, sh) for sh in TABLE_SHARES]
        t.errors = int((~t_ok).sum())
        at = coverage_point(t_risk, t_ok, review["share"])
        review.update(caught=at.caught, accepted_accuracy=at.accepted_accuracy)
    return t
