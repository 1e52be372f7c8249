"""One streaming pass over a predictions CSV: the counts and the capped lists a report needs.

Counts, the confusion matrix, the confidence histogram and the per-group (slide) tallies are
accumulated row by row; only a capped number of rows is kept (the most confident mistakes of
each true/predicted pair, the least confident predictions, the first failed files), so memory
does not grow with the number of rows. Every low-confidence row goes straight to review.csv
as it is read, which is why the scan, not the report data, writes that one file.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ExitCode, WbcBatchError
from ..inference.predictions import ENCODING_ERRORS, PROB_PREFIX, STATUS_OK

HIST_BINS = 20
REVIEW_COLUMNS = ["path", "label", "confidence", "true_label", "group"]
_REQUIRED = ("path", "label", "confidence", "true_label", "status", "error")


class ReportError(WbcBatchError):
    """The predictions CSV cannot be reported on; the message says why."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class ReportLimits:
    """Caps on what the HTML shows and embeds (the CSVs hold everything), so a 100,000-row run stays small."""

    gallery_per_pair: int = 8
    gallery_max: int = 160
    review_max: int = 500
    review_images: int = 60
    failed_max: int = 1000
    top_confusions: int = 10


@dataclass
class Group:
    """Tallies of one slide/sample folder: predicted and (with truth) true counts per class."""

    n: int = 0
    errors: int = 0
    low: int = 0
    counts: list[int] = field(default_factory=list)
    true_counts: list[int] = field(default_factory=list)
    with_truth: int = 0
    correct: int = 0


@dataclass
class Scan:
    """What one pass over the CSV found; the heaps hold the rows the HTML shows."""

    labels: list[str]
    files: int = 0
    ok: int = 0
    errors: int = 0
    without_truth: int = 0
    malformed: int = 0
    low_confidence: int = 0
    cm: list[list[int]] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    conf_sum: list[float] = field(default_factory=list)
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    groups: dict[str, Group] = field(default_factory=dict)
    gallery: dict[tuple[int, int], list] = field(default_factory=dict)  # min-heaps of (conf, seq, path)
    review: list = field(default_factory=list)  # heap (by -conf) of (-conf, seq, path, pred, truth, group)
    failed: list[tuple[str, str]] = field(default_factory=list)


def group_key(rel: str, level: int) -> str:
    """The first ``level`` folders of a run-relative path ('.' for files directly under the root)."""
    parts = PurePosixPath(rel).parts[:-1]
    return "/".join(parts[:level]) if parts else "."


def labels_from_header(header: Sequence[str], path: Path) -> list[str]:
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise ReportError(f"{path} is not a predictions CSV: no {', '.join(missing)} column(s) in its header {list(header)[:8]}")
    labels = [c[len(PROB_PREFIX) :] for c in header if c.startswith(PROB_PREFIX)]
    if not labels:
        raise ReportError(f"{path} has no {PROB_PREFIX}<LABEL> columns, so its class list is unknown")
    return labels


def _push_capped(heap: list, item: Any, cap: int) -> None:
    """Keep the ``cap`` largest items of a stream in a min-heap."""
    if len(heap) < cap:
        heapq.heappush(heap, item)
    elif cap > 0 and item > heap[0]:
        heapq.heapreplace(heap, item)


class _Scanner:
    """Folds rows into a :class:`Scan`; one method per kind of row keeps each step short."""

    def __init__(self, header: Sequence[str], path: Path, level: int, threshold: float, limits: ReportLimits, review: Any) -> None:
        labels = labels_from_header(header, path)
        k = len(labels)
        self.s = Scan(labels=labels, cm=[[0] * k for _ in range(k)], predicted=[0] * k, conf_sum=[0.0] * k)
        col = {c: i for i, c in enumerate(header)}
        self.cols = tuple(col[c] for c in _REQUIRED)
        self.ncols = len(header)
        self.index = {lb: i for i, lb in enumerate(labels)}
        self.level, self.threshold, self.limits, self.review = level, threshold, limits, review
        self.seq = 0

    def row(self, rec: list[str]) -> None:
        s = self.s
        if len(rec) != self.ncols:
            s.malformed += 1  # e.g. a torn last line of an interrupted run
            return
        i_path, i_label, i_conf, i_true, i_status, i_err = self.cols
        rel = rec[i_path]
        gk = group_key(rel, self.level)
        g = s.groups.get(gk)
        if g is None:
            k = len(s.labels)
            g = s.groups[gk] = Group(counts=[0] * k, true_counts=[0] * k)
        if rec[i_status] != STATUS_OK:
            s.files += 1
            g.n += 1
            s.errors += 1
            g.errors += 1
            if len(s.failed) < self.limits.failed_max:
                s.failed.append((rel, rec[i_err]))
            return
        pi = self.index.get(rec[i_label])
        try:
            conf = float(rec[i_conf])
        except ValueError:
            pi = None
        if pi is None or not (0.0 <= conf <= 1.0):
            s.malformed += 1
            return
        self._ok(rel, rec[i_label], rec[i_conf], pi, conf, rec[i_true], gk, g)

    def _ok(self, rel: str, label: str, conf_text: str, pi: int, conf: float, truth: str, gk: str, g: Group) -> None:
        s = self.s
        s.files += 1
        g.n += 1
        s.ok += 1
        g.counts[pi] += 1
        s.predicted[pi] += 1
        s.conf_sum[pi] += conf
        s.hist[min(int(conf * HIST_BINS), HIST_BINS - 1)] += 1
        self.seq += 1
        if conf < self.threshold:
            s.low_confidence += 1
            g.low += 1
            self.review.writerow([rel, label, conf_text, truth, gk])
            _push_capped(s.review, (-conf, self.seq, rel, pi, truth, gk), self.limits.review_max)
        ti = self.index.get(truth) if truth else None
        if ti is None:
            s.without_truth += 1
            return
        s.cm[ti][pi] += 1
        g.true_counts[ti] += 1
        g.with_truth += 1
        if ti == pi:
            g.correct += 1
        else:
            _push_capped(s.gallery.setdefault((ti, pi), []), (conf, self.seq, rel), self.limits.gallery_per_pair)


def scan(csv_path: Path, level: int, threshold: float, review_csv: Path, limits: ReportLimits) -> Scan:
    """Read ``csv_path`` once; write every prediction below ``threshold`` to ``review_csv``."""
    try:
        f = open(csv_path, encoding="utf-8", errors=ENCODING_ERRORS, newline="")
    except OSError as e:
        raise ReportError(f"cannot read {csv_path}: {e.strerror or e}") from e
    with f, open(review_csv, "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as rf:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ReportError(f"{csv_path} is empty")
        review = csv.writer(rf, lineterminator="\n")
        scanner = _Scanner(header, csv_path, level, threshold, limits, review)
        review.writerow(REVIEW_COLUMNS)
        for rec in reader:
            scanner.row(rec)
    return scanner.s
