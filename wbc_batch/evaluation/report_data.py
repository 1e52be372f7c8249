"""Everything a report shows, as data: built from one scan of the CSV and its sidecar.

The artefact writers (:mod:`.report_files`) and the HTML template (:mod:`.report_render`)
read only a :class:`ReportData`, so a number is computed once and every output agrees.
``metrics`` is exactly what metrics.json holds; the other fields are the tables and the
capped lists the HTML shows, in display order.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .corrections import Verified
from .metrics import metrics_from_confusion
from .report_images import CellImages
from .report_scan import Group, ReportLimits, Scan
from .report_trust import TrustData

_NO_SCORES = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall", "weighted_f1")


def pct(a: int, b: int) -> float:
    return 100.0 * a / b if b else 0.0


@dataclass
class ClassRow:
    """One class: what was predicted, and with truth how well."""

    label: str
    predicted: int
    share: float
    mean_confidence: float | None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    support: int | None = None


@dataclass
class Cell:
    """One file the HTML shows with its pictures (``images`` None: not embedded, or unreadable)."""

    path: str
    predicted: str
    confidence: float
    true_label: str = ""
    group: str = ""
    images: CellImages | None = None
    risk: float | None = None
    in_domain: str = ""  # 'true'/'false' with a domain check, else ''
    record: int = 0  # the row's record number in the predictions CSV
    runner_up: str = ""  # the class with the second-highest probability ('' when unknown)
    runner_up_p: float | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass
class GalleryPair:
    """The most confident mistakes of one (true, predicted) pair; ``total`` of them in the run."""

    true: str
    predicted: str
    total: int
    cells: list[Cell]


@dataclass
class GroupRow:
    """One slide/sample folder of the differential; the true counts are zeros without truth."""

    name: str
    n: int
    errors: int
    low: int
    predicted: list[int]
    true: list[int]
    with_truth: int
    correct: int

    @property
    def ok(self) -> int:
        return self.n - self.errors

    @property
    def percent(self) -> list[float]:
        return [pct(c, self.ok) for c in self.predicted]

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.with_truth if self.with_truth else None


@dataclass
class ReportData:
    """The report: metrics.json's content plus the tables and lists of report.html."""

    title: str
    labels: list[str]
    has_truth: bool
    threshold: float
    metrics: dict
    classes: list[ClassRow]
    confusion: list[list[int]]
    hist: list[int]
    gallery: list[GalleryPair]
    gallery_hidden: int
    groups: list[GroupRow] | None
    group_level: int
    review: list[Cell]
    failed: list[tuple[str, str]]
    limits: ReportLimits
    figures: dict[str, str] = field(default_factory=dict)  # kind -> PNG data URI
    curves: tuple[str, str] | None = None  # (PNG data URI, where it came from)
    trust: TrustData | None = None
    verified: Verified | None = None
    review_key: str = ""  # what the page keeps a reviewer's choices under in the browser
    corrections: dict[str, str] = field(default_factory=dict)  # the choices the report was given (path -> label)
    corrected: dict[str, str] = field(default_factory=dict)  # the model's label of each of those files

    @property
    def counts(self) -> dict:
        return self.metrics["counts"]

    @property
    def shown(self) -> list[Cell]:
        """Every cell the page lists: the gallery's, then the review queue's."""
        return [c for pair in self.gallery for c in pair.cells] + self.review


def _class_rows(s: Scan, m: dict, has_truth: bool) -> list[ClassRow]:
    rows = []
    for i, lb in enumerate(s.labels):
        pc = m["per_class"][lb]
        mean = s.conf_sum[i] / s.predicted[i] if s.predicted[i] else None
        row = ClassRow(lb, s.predicted[i], pct(s.predicted[i], s.ok), mean)
        if has_truth:
            row.precision, row.recall, row.f1, row.support = pc["precision"], pc["recall"], pc["f1"], pc["support"]
        rows.append(row)
    return rows


def _scores(s: Scan, cm: np.ndarray, has_truth: bool) -> dict:
    """The metrics.json scores: sklearn-equal metrics with truth, predicted shares without."""
    labels = s.labels
    mean = [s.conf_sum[i] / s.predicted[i] if s.predicted[i] else None for i in range(len(labels))]
    if has_truth:
        m = metrics_from_confusion(cm, labels).to_dict()
        for i, lb in enumerate(labels):
            m["per_class"][lb].update(predicted=s.predicted[i], mean_confidence=mean[i])
        return m
    per_class = {
        lb: {"predicted": s.predicted[i], "percent": pct(s.predicted[i], s.ok), "mean_confidence": mean[i]} for i, lb in enumerate(labels)
    }
    return {
        "labels": labels,
        "n": 0,
        **dict.fromkeys(_NO_SCORES),
        "per_class": per_class,
        "confusion_matrix": None,
        "confusion_matrix_normalized": None,
    }


def _top_confusions(cm: np.ndarray, labels: list[str], n: int) -> list[dict]:
    k = len(labels)
    pairs = sorted(((int(cm[t, p]), t, p) for t in range(k) for p in range(k) if t != p and cm[t, p]), key=lambda x: (-x[0], x[1], x[2]))
    support = cm.sum(axis=1)
    return [
        {"true": labels[t], "predicted": labels[p], "count": c, "percent_of_true": round(pct(c, int(support[t])), 4)}
        for c, t, p in pairs[:n]
    ]


def _metrics(
    s: Scan, cm: np.ndarray, side: dict, csv_path: Path, threshold: float, group_by: int | None, warnings: list[str], limits
) -> dict:
    has_truth = s.ok - s.without_truth > 0
    model = dict(side.get("model") or {})
    summary = side.get("summary") or {}
    return {
        **_scores(s, cm, has_truth),
        "has_truth": has_truth,
        "counts": {
            "files": s.files,
            "ok": s.ok,
            "errors": s.errors,
            "with_truth": s.ok - s.without_truth,
            "without_truth": s.without_truth,
            "low_confidence": s.low_confidence,
            "malformed_rows": s.malformed,
        },
        "review_threshold": threshold,
        "top_confusions": _top_confusions(cm, s.labels, limits.top_confusions),
        "model": {key: model.get(key) for key in ("name", "sha256", "labels", "arch", "path")},
        "root": side.get("root"),
        "inputs": side.get("inputs"),
        "predictions_csv": str(csv_path.resolve()),
        "throughput": {
            "images_per_s": summary.get("images_per_s"),
            "wall_s": summary.get("wall_s"),
            "processed": summary.get("processed"),
            "options": side.get("options"),
        },
        "run": {"started": side.get("started"), "finished": side.get("finished"), "state": side.get("state")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "group_by": group_by,
        "warnings": warnings,  # the same list: warnings raised later (figures, curves) still land in metrics.json
    }


def _gallery(s: Scan, cm: np.ndarray, limits: ReportLimits) -> tuple[list[GalleryPair], int]:
    """Pairs by frequency, each with its most confident mistakes, until ``gallery_max`` cells; and how many pairs did not fit."""
    order = sorted(s.gallery, key=lambda tp: (-int(cm[tp]), tp))
    budget = limits.gallery_max
    pairs = []
    for t, p in order:
        if budget <= 0:
            break
        items = sorted(s.gallery[(t, p)], key=lambda x: (-x[0], x[1]))[:budget]
        budget -= len(items)
        cells = [Cell(rel, s.labels[p], conf, s.labels[t], record=rec) for conf, rec, rel in items]
        pairs.append(GalleryPair(s.labels[t], s.labels[p], int(cm[t, p]), cells))
    return pairs, len(order) - len(pairs)


def _group_rows(groups: dict[str, Group]) -> list[GroupRow]:
    return [GroupRow(gk, g.n, g.errors, g.low, g.counts, g.true_counts, g.with_truth, g.correct) for gk, g in sorted(groups.items())]


def runner_up(probs: Sequence[float] | None, labels: Sequence[str], predicted: str) -> tuple[str, float | None]:
    """The most probable class other than ``predicted``, and its probability (('', None) without probabilities)."""
    if not probs:
        return "", None
    best = max((p, -i) for i, (lb, p) in enumerate(zip(labels, probs, strict=True)) if lb != predicted)
    return labels[-best[1]], best[0]


def review_key(m: dict) -> str:
    """The page's key for a reviewer's choices: the run (predictions CSV, model, start), so a report written again
    for the same run finds them, and another run's report does not."""
    ident = "\0".join(str(x) for x in (m["predictions_csv"], m["model"].get("sha256"), m["run"].get("started")))
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def build_report_data(
    s: Scan, side: dict, csv_path: Path, threshold: float, group_level: int | None, limits: ReportLimits, warnings: list[str],
    *, review: list[dict], trust: TrustData, probs: dict[int, list[float]] | None = None,
) -> ReportData:
    """The report of one scan; ``group_level`` None: no differential. ``review``: the first rows of review.csv;
    ``probs``: the class probabilities of the shown rows, by record number."""
    k = len(s.labels)
    cm = np.asarray(s.cm, dtype=np.int64).reshape(k, k)
    m = _metrics(s, cm, side, csv_path, threshold, group_level, warnings, limits)
    m["trust"] = trust.to_json()
    has_truth = m["has_truth"]
    gallery, hidden = _gallery(s, cm, limits) if has_truth else ([], 0)
    cells = [Cell(r["path"], r["label"], float(r["confidence"]), r["true_label"], r["group"], risk=float(r["risk"]),
                  in_domain=r.get("in_domain", ""), record=r.get("record", 0)) for r in review]
    for c in [c for pair in gallery for c in pair.cells] + cells:
        c.runner_up, c.runner_up_p = runner_up((probs or {}).get(c.record), s.labels, c.predicted)
    return ReportData(
        title=f"wbc-batch report: {csv_path.name}",
        labels=s.labels,
        has_truth=has_truth,
        threshold=threshold,
        metrics=m,
        classes=_class_rows(s, m, has_truth),
        confusion=cm.tolist(),
        hist=list(s.hist),
        gallery=gallery,
        gallery_hidden=hidden,
        groups=_group_rows(s.groups) if group_level else None,
        group_level=group_level or 0,
        review=cells,
        failed=list(s.failed),
        limits=limits,
        trust=trust,
        review_key=review_key(m),
    )
