"""Two streaming passes over a predictions CSV: the counts and the capped lists a report needs, then review.csv.

Counts, the confusion matrix, the confidence histogram and the per-group (slide) tallies are
accumulated row by row; only a capped number of rows is kept (the most confident mistakes of
each true/predicted pair, the first failed files) plus a few numbers per classified row (risk,
confidence, correct, in domain: what the review queue, the calibration and the risk-coverage
curve need; about 20 bytes a row). The review queue is the riskiest rows, which are known only at
the end, so a second pass (:func:`write_review`) copies them to review.csv, riskiest first.
"""

from __future__ import annotations

import csv
import heapq
from array import array
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..csv_safety import CsvWriter, plain_path
from ..errors import ExitCode, WbcBatchError
from ..inference.predictions import ENCODING_ERRORS, PROB_PREFIX, STATUS_OK, path_lines
from ..inference.rows import risk as risk_of
from .corrections import CorrectionsError, LabelRow, Reviewed, Verified, named, verify

HIST_BINS = 20
REVIEW_COLUMNS = ["path", "label", "confidence", "risk", "true_label", "group"]
#: Appended to review.csv's columns for a CSV written by a model with a domain check.
REVIEW_DOMAIN_COLUMNS = ["ood_score", "in_domain"]
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
    gallery: dict[tuple[int, int], list] = field(default_factory=dict)  # min-heaps of (conf, record, path)
    failed: list[tuple[str, str]] = field(default_factory=list)
    domain: bool = False  # the CSV has the domain check's columns (risk, ood_score, in_domain)
    # One entry per classified row, in CSV order:
    risk: array = field(default_factory=lambda: array("d"))  # the CSV's risk column, else rows.risk(confidence)
    confidence: array = field(default_factory=lambda: array("d"))
    correct: array = field(default_factory=lambda: array("b"))  # 1 right, 0 wrong, -1 no true label
    in_domain: array = field(default_factory=lambda: array("b"))  # 1, 0, or -1 without a domain check
    record: array = field(default_factory=lambda: array("q"))  # the row's record number in the CSV (header = 0)
    # One entry per row of the header's width: hash() of its path, to find a file named twice without a set of paths.
    path_hash: array = field(default_factory=lambda: array("q"))
    # With corrections: the classified rows they name, and the paths they name that are error rows.
    reviewed: dict[str, Reviewed] = field(default_factory=dict)
    reviewed_failed: list[str] = field(default_factory=list)


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

    def __init__(self, header: Sequence[str], path: Path, level: int, threshold: float, limits: ReportLimits,
                 corrections: Mapping[str, LabelRow] | None = None) -> None:
        labels = labels_from_header(header, path)
        k = len(labels)
        self.s = Scan(labels=labels, cm=[[0] * k for _ in range(k)], predicted=[0] * k, conf_sum=[0.0] * k)
        col = {c: i for i, c in enumerate(header)}
        self.cols = tuple(col[c] for c in _REQUIRED)
        self.ncols = len(header)
        self.index = {lb: i for i, lb in enumerate(labels)}
        self.level, self.threshold, self.limits = level, threshold, limits
        self.s.domain = all(c in col for c in ("risk", "in_domain"))
        self.i_risk, self.i_in = (col["risk"], col["in_domain"]) if self.s.domain else (-1, -1)
        self.n_records = 0
        self.corrections = corrections  # run-relative path -> the reviewer's label (a model label or EXCLUDE)

    def row(self, rec: list[str]) -> None:
        self.n_records += 1
        s = self.s
        if len(rec) != self.ncols:
            s.malformed += 1  # e.g. a torn last line of an interrupted run
            return
        i_path, i_label, i_conf, i_true, i_status, i_err = self.cols
        rel = plain_path(rec[i_path])
        s.path_hash.append(hash(rel))
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
            if self.corrections is not None:
                self._review(rel, gk, None, None)
            return
        pi = self.index.get(rec[i_label])
        try:
            conf = float(rec[i_conf])
        except ValueError:
            pi = None
        if pi is None or not (0.0 <= conf <= 1.0):
            s.malformed += 1
            return
        inside = -1 if not s.domain else {"true": 1, "false": 0}.get(rec[self.i_in], -1)
        risk = _float(rec[self.i_risk]) if s.domain else None
        ti = self._ok(rel, pi, conf, rec[i_true], g, inside, risk_of(conf) if risk is None else risk)
        if self.corrections is not None:  # checked here: a call per row would cost a report without corrections
            self._review(rel, gk, pi, ti)

    def _review(self, rel: str, gk: str, pi: int | None, ti: int | None) -> None:
        """Note a row the corrections name: classified (``pi``, the model's label) or an error row (``pi`` None)."""
        chosen = self.corrections.get(rel)  # type: ignore[union-attr]  # only called with corrections
        if chosen is None:
            return
        if pi is None:
            self.s.reviewed_failed.append(rel)
        else:
            self.s.reviewed[rel] = Reviewed(gk, pi, -1 if ti is None else ti, self.index.get(chosen.label, -1))

    def _ok(self, rel: str, pi: int, conf: float, truth: str, g: Group, inside: int, risk: float) -> int | None:
        """Fold one classified row in; returns its true label's index (None: no true label)."""
        s = self.s
        s.files += 1
        g.n += 1
        s.ok += 1
        g.counts[pi] += 1
        s.predicted[pi] += 1
        s.conf_sum[pi] += conf
        s.hist[min(int(conf * HIST_BINS), HIST_BINS - 1)] += 1
        if conf < self.threshold:
            s.low_confidence += 1
            g.low += 1
        ti = self.index.get(truth) if truth else None
        s.risk.append(risk)
        s.confidence.append(conf)
        s.correct.append(-1 if ti is None else int(ti == pi))
        s.in_domain.append(inside)
        s.record.append(self.n_records)
        if ti is None:
            s.without_truth += 1
            return None
        s.cm[ti][pi] += 1
        g.true_counts[ti] += 1
        g.with_truth += 1
        if ti == pi:
            g.correct += 1
        else:
            _push_capped(s.gallery.setdefault((ti, pi), []), (conf, self.n_records, rel), self.limits.gallery_per_pair)
        return ti


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _open(csv_path: Path):
    try:
        return open(csv_path, encoding="utf-8", errors=ENCODING_ERRORS, newline="")
    except OSError as e:
        raise ReportError(f"cannot read {csv_path}: {e.strerror or e}") from e


def scan(csv_path: Path, level: int, threshold: float, limits: ReportLimits, corrections: Mapping[str, LabelRow] | None = None) -> Scan:
    """Read ``csv_path`` once: the counts, the capped lists and the per-row numbers (and the rows ``corrections`` names)."""
    with _open(csv_path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ReportError(f"{csv_path} is empty")
        scanner = _Scanner(header, csv_path, level, threshold, limits, corrections)
        for rec in reader:
            scanner.row(rec)
    refuse_repeated_paths(csv_path, scanner.s.path_hash)
    return scanner.s


def csv_labels(csv_path: Path) -> list[str]:
    """The model labels a predictions CSV's header names (its prob_<LABEL> columns), from the header alone."""
    with _open(csv_path) as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise ReportError(f"{csv_path} is empty")
    return labels_from_header(header, csv_path)


def verified_of(s: Scan, table: Mapping[str, LabelRow], source: str, csv_path: Path) -> Verified:
    """The verified differential, once every correction has found its classified row in the CSV.

    A correction whose path is not in the CSV, or is a file that failed to classify, is a :class:`CorrectionsError`
    naming its rows: it would be counted nowhere, and a differential that silently drops what a reviewer said is wrong.
    """
    failed = set(s.reviewed_failed)
    lost = [r for path, r in table.items() if path not in s.reviewed]
    if lost:
        problems = [f"line {r.line}: {r.path!r} " + ("failed to classify (an error row)" if r.path in failed else f"is not in {csv_path.name}")
                    for r in sorted(lost, key=lambda r: r.line)]
        raise CorrectionsError(f"{source}: {len(lost)} correction(s) name no classified file of {csv_path}: {named(problems)}")
    groups = {gk: g.counts for gk, g in s.groups.items()}
    return verify(source, s.labels, s.predicted, groups, s.cm, s.reviewed.values())


#: How many repeated files, and lines of each, a refusal names.
SHOWN_REPEATS = 5


def refuse_repeated_paths(csv_path: Path, path_hash: array) -> None:
    """ReportError naming the lines when a file has more than one row: every count would take it twice.

    Why refused rather than counted once: which of the rows is right is unknown (a merged or edited
    CSV, a resume of an older version); classify writes one row per file. Equal hashes are only
    candidates, confirmed by their paths in a second read that runs only then.
    """
    h = np.sort(np.frombuffer(path_hash, dtype=np.int64))
    candidates = set(h[1:][h[1:] == h[:-1]].tolist())
    if not candidates:
        return
    repeated = [(rel, lines) for rel, lines in path_lines(csv_path, lambda rel: hash(rel) in candidates).items() if len(lines) > 1]
    if not repeated:
        return
    named = [f"{rel!r} on lines {', '.join(map(str, lines[:SHOWN_REPEATS]))}{', ...' if len(lines) > SHOWN_REPEATS else ''}" for rel, lines in repeated[:SHOWN_REPEATS]]
    more = [f"and {len(repeated) - SHOWN_REPEATS} more files"] if len(repeated) > SHOWN_REPEATS else []
    raise ReportError(
        f"{csv_path} names a file more than once, so its rows would be counted twice: {'; '.join(named + more)}; "
        "keep one row per file (wbc-batch classify writes one) and report again"
    )


def write_review(
    csv_path: Path, s: Scan, queue: Sequence[int], level: int, review_csv: Path, keep: int, shown: Collection[int] = ()
) -> tuple[list[dict[str, str]], dict[int, list[float]]]:
    """Copy the rows ``queue`` names (indices into the scan's per-row arrays, riskiest first) to ``review_csv``, in that order.

    Returns the first ``keep`` of them as dicts of review.csv's columns (plus ``record``, the row's record number),
    for the HTML, and the class probabilities of those rows and of the records ``shown`` (the gallery's), by record
    number: the page shows each cell's runner-up class, which only the CSV's probability columns hold.
    """
    rank = {s.record[i]: r for r, i in enumerate(queue)}
    wanted = set(shown) | {s.record[i] for i in queue[:keep]}
    picked: list[list[str] | None] = [None] * len(queue)
    probs: dict[int, list[float]] = {}
    with _open(csv_path) as f:
        reader = csv.reader(f)
        header = next(reader)
        col = {c: i for i, c in enumerate(header)}
        fields = ["path", "label", "confidence", "true_label"]
        extra = REVIEW_DOMAIN_COLUMNS if s.domain else []
        prob_cols = [col[PROB_PREFIX + lb] for lb in s.labels]
        for n, rec in enumerate(reader, start=1):
            if n in wanted:
                probs[n] = [_float(rec[i]) or 0.0 for i in prob_cols]
            r = rank.get(n)
            if r is not None:
                path, label, conf, truth = (rec[col[c]] for c in fields)
                path = plain_path(path)
                picked[r] = [path, label, conf, f"{s.risk[queue[r]]:.6f}", truth, group_key(path, level), *(rec[col[c]] for c in extra)]
    names = REVIEW_COLUMNS + (REVIEW_DOMAIN_COLUMNS if s.domain else [])
    with open(review_csv, "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as rf:
        w = CsvWriter(rf)
        w.writerow(names)
        w.writerows(row for row in picked if row is not None)  # neutralised in the CSV; the HTML gets the cells as they are
    rows = [dict(zip(names, row, strict=True)) | {"record": s.record[i]} for row, i in zip(picked[:keep], queue, strict=False) if row is not None]
    return rows, probs
