"""A reviewer's corrections and the verified differential they give.

A lab's analyser pre-classifies and a technologist verifies: the cells the model is least sure of are
looked at, some are reclassified, some are set aside (not a cell, cannot tell), and the differential
that is signed out is the verified one. The report page records those choices and saves them as
``corrections.csv``: ``path,label``, the format of classify's and train's ``--labels`` (paths relative
to the input root), where ``label`` is one of the model's labels or :data:`EXCLUDE`. Reading it here
gives the verified counts (overall and per slide, ``report --corrections``), and training reads the
same file (``train ROOT --labels``), so what a reviewer knows reaches the model.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ..csv_safety import reading_csv
from ..errors import ExitCode, WbcBatchError

#: The label of a cell left out of the differential: not a white cell, or one that cannot be told.
EXCLUDE = "EXCLUDE"
#: How many bad rows an error names (the rest are counted).
SHOWN_ROWS = 10


class CorrectionsError(WbcBatchError):
    """A corrections (or labels) CSV that cannot be used; the message names the rows (a usage error: the user gave it)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class LabelRow:
    """One ``path,label`` row: its line in the file, the run-relative path and the label as written."""

    line: int
    path: str
    label: str


def normal_path(text: str, root: str | os.PathLike[str] | None = None) -> str:
    """The run-relative ``/`` path a CSV cell names: an absolute path is made relative to ``root``; ``./`` and
    doubled slashes go (``./=x.jpeg`` is predictions.csv's spelling of ``=x.jpeg``)."""
    p = text.strip()
    if os.path.isabs(p) and root is not None:
        p = os.path.relpath(p, os.path.abspath(root))
    return PurePosixPath(p.replace(os.sep, "/")).as_posix()


def named(problems: Sequence[str]) -> str:
    """The first :data:`SHOWN_ROWS` problems, then how many more."""
    more = [f"and {len(problems) - SHOWN_ROWS} more"] if len(problems) > SHOWN_ROWS else []
    return "; ".join([*problems[:SHOWN_ROWS], *more])


def read_path_labels(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> list[LabelRow]:
    """The rows of a ``path,label`` CSV (header names in any case, other columns ignored, blank lines skipped).

    Every row with an empty path or label is named in one :class:`CorrectionsError`, not the first only.
    """
    with reading_csv(path, CorrectionsError), open(path, encoding="utf-8-sig", newline="") as f:
        rows, bad = _label_rows(csv.reader(f), root, path)
    if bad:
        raise CorrectionsError(f"{path}: {named(bad)}")
    return rows


def _label_rows(reader, root: str | os.PathLike[str] | None, path: str | os.PathLike[str]) -> tuple[list[LabelRow], list[str]]:
    """The rows a ``csv.reader`` gives, and what is wrong with the others."""
    header = [c.strip().lower() for c in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise CorrectionsError(f"{path}: needs a header with 'path' and 'label' columns, found {header}")
    ip, il = header.index("path"), header.index("label")
    rows: list[LabelRow] = []
    bad: list[str] = []
    for rec in reader:
        if not any(c.strip() for c in rec):
            continue
        p, lb = (rec[i].strip() if i < len(rec) else "" for i in (ip, il))
        if p and lb:
            rows.append(LabelRow(reader.line_num, normal_path(p, root), lb))
        else:
            bad.append(f"line {reader.line_num}: empty path or label")
    return rows, bad


def canonical_labels(rows: Iterable[LabelRow], labels: Sequence[str], source: str) -> dict[str, LabelRow]:
    """``{path: row}`` with each label spelt as in ``labels`` (case-insensitive match) or :data:`EXCLUDE`.

    A label that is neither, or a path given twice with two labels, is a :class:`CorrectionsError` naming every
    such row: a correction must say one thing the report can count.
    """
    known = {lb.upper(): lb for lb in labels} | {EXCLUDE: EXCLUDE}
    out: dict[str, LabelRow] = {}
    bad: list[str] = []
    for r in rows:
        label = known.get(r.label.upper())
        if label is None:
            bad.append(f"line {r.line}: label {r.label!r} is neither one of the model's labels {list(labels)} nor {EXCLUDE}")
        elif r.path in out and out[r.path].label != label:
            bad.append(f"line {r.line}: {r.path!r} is given twice, as {out[r.path].label!r} (line {out[r.path].line}) and {label!r}")
        elif r.path not in out:  # the same label twice says one thing: the first line is the one named
            out[r.path] = LabelRow(r.line, r.path, label)
    if bad:
        raise CorrectionsError(f"{source}: {named(bad)}")
    return out


def read_corrections(path: str | os.PathLike[str], labels: Sequence[str], root: str | os.PathLike[str] | None = None) -> dict[str, LabelRow]:
    """A corrections CSV checked against the model's ``labels``: ``{run-relative path: row}``."""
    return canonical_labels(read_path_labels(path, root), labels, str(path))


@dataclass
class Tally:
    """Verified counts of one slide (or of the whole run): the model's counts with the reviewer's choices applied."""

    counts: list[int]
    reviewed: int = 0
    changed: int = 0
    excluded: int = 0

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def percent(self) -> list[float]:
        n = self.n
        return [100.0 * c / n if n else 0.0 for c in self.counts]

    def apply(self, predicted: int, chosen: int) -> None:
        """One reviewed cell: ``chosen`` is a label index, or -1 for :data:`EXCLUDE`."""
        self.reviewed += 1
        self.counts[predicted] -= 1
        if chosen < 0:
            self.excluded += 1
            return
        self.counts[chosen] += 1
        self.changed += chosen != predicted

    def to_json(self, labels: Sequence[str]) -> dict:
        return {"reviewed": self.reviewed, "changed": self.changed, "excluded": self.excluded, "n": self.n,
                "counts": dict(zip(labels, self.counts, strict=True)),
                "percent": {lb: round(p, 4) for lb, p in zip(labels, self.percent, strict=True)}}


@dataclass(frozen=True)
class Reviewed:
    """A classified row the corrections name: its group, the model's label, the truth (-1: none) and the choice (-1: EXCLUDE)."""

    group: str
    predicted: int
    truth: int
    chosen: int


@dataclass
class Verified:
    """The verified differential of a run: overall, per group, and (with truth) the accuracy of the verified labels."""

    source: str
    labels: list[str]
    overall: Tally
    groups: dict[str, Tally]
    with_truth: int = 0  # classified rows with a true label, the excluded ones left out
    correct: int = 0  # of those, the verified label is the true one
    model_correct: int = 0  # the model's label was right, on the same rows
    truth_counts: list[int] = field(default_factory=list)  # true labels of those rows, per class
    model_truth: tuple[list[int], list[int]] = ([], [])  # the model's and the true labels of every row with a true label, per class

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.with_truth if self.with_truth else None

    @property
    def model_accuracy(self) -> float | None:
        return self.model_correct / self.with_truth if self.with_truth else None

    @property
    def all_known(self) -> bool:
        """Every cell of the verified differential has a true label, so it can be compared with the true one."""
        return bool(self.with_truth) and self.with_truth == self.overall.n

    @property
    def differential_error(self) -> dict[str, float] | None:
        """How far the model's and the verified differential are from the true one, in percentage points: half the sum
        over the classes of |share - true share| (the share of cells that would have to change class). None unless
        every cell has a true label."""
        if not self.all_known:
            return None
        return {"model": half_l1(*self.model_truth), "verified": half_l1(self.overall.counts, self.truth_counts)}

    def to_json(self) -> dict:
        out = {"corrections": self.source, **self.overall.to_json(self.labels)}
        if self.with_truth:
            out.update(with_truth=self.with_truth, accuracy=self.accuracy, model_accuracy=self.model_accuracy)
        if (err := self.differential_error) is not None:
            out["differential_error"] = err
        return out


def verify(
    source: str, labels: Sequence[str], predicted: Sequence[int], groups: Mapping[str, Sequence[int]],
    confusion: Sequence[Sequence[int]], reviewed: Iterable[Reviewed],
) -> Verified:
    """The verified differential from the model's counts (overall ``predicted``, per group, the confusion matrix
    of the rows with truth) and the reviewed rows: a cell's verified label is the reviewer's where there is one."""
    k = len(labels)
    v = Verified(source, list(labels), Tally(list(predicted)), {g: Tally(list(c)) for g, c in groups.items()})
    truth = [sum(row) for row in confusion]
    v.model_correct = v.correct = sum(confusion[i][i] for i in range(k))
    v.with_truth = sum(truth)
    for r in reviewed:
        v.overall.apply(r.predicted, r.chosen)
        v.groups[r.group].apply(r.predicted, r.chosen)
        if r.truth < 0:
            continue
        right = r.predicted == r.truth
        if r.chosen < 0:
            v.with_truth -= 1
            truth[r.truth] -= 1
            v.model_correct -= right
            v.correct -= right
        else:
            v.correct += (r.chosen == r.truth) - right
    v.truth_counts = truth
    v.model_truth = ([sum(row[j] for row in confusion) for j in range(k)], [sum(row) for row in confusion])
    return v


def half_l1(counts: Sequence[int], truth: Sequence[int]) -> float:
    """Half the L1 distance between two differentials, in percentage points (0: the same shares, 100: disjoint)."""
    n, t = sum(counts), sum(truth)
    if not n or not t:
        return 0.0
    return round(50.0 * sum(abs(c / n - x / t) for c, x in zip(counts, truth, strict=True)), 4)
