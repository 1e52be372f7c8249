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

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..inference.truth import EXCLUDE as EXCLUDE  # re-exported: the review side's names for the shared reader
from ..inference.truth import LabelRow as LabelRow
from ..inference.truth import LabelsError, canonical_labels
from ..inference.truth import named as named
from ..inference.truth import read_path_labels as read_path_labels

#: One error for every ``path,label`` file: a corrections CSV is a labels CSV (the reader is the inference side's).
CorrectionsError = LabelsError


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
