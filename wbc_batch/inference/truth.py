"""Where the true label of an input comes from: a class-named parent folder, or a labels CSV."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..csv_safety import reading_csv
from ..errors import ExitCode, WbcBatchError


class LabelsError(WbcBatchError):
    """A ``path,label`` CSV (labels, corrections) that cannot be used; the message names the rows (a usage error:
    the user gave that file)."""

    exit_code = ExitCode.USAGE


def folder_truth(rel: str, labels: Sequence[str]) -> str:
    """The model label that the file's parent folder is named after (case-insensitive), else ''."""
    parent = PurePosixPath(rel).parent.name
    if not parent:
        return ""
    by_upper = {lb.upper(): lb for lb in labels}
    return by_upper.get(parent.upper(), "")


def truth_function(labels: Sequence[str], table: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """The run's one source of true labels: the labels table first (``""`` there: no truth), then the class-named
    parent folder.

    The orchestrator builds it and hands it to the engine, so every engine (and the
    ``classify()`` API) labels a file the same way.
    """
    lookup = table or {}

    def truth(rel: str) -> str:
        return lookup[rel] if rel in lookup else folder_truth(rel, labels)

    return truth


#: The label of a cell left out of the differential (and of any truth): not a white cell, or one that cannot be told.
EXCLUDE = "EXCLUDE"
#: How many bad rows an error names (the rest are counted).
SHOWN_ROWS = 10


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

    One reader for every ``path,label`` file (classify's and train's ``--labels``, a reviewer's corrections.csv):
    every row with an empty path or label is named in one :class:`LabelsError`, not the first only.
    """
    with reading_csv(path, LabelsError), open(path, encoding="utf-8-sig", newline="") as f:
        rows, bad = _label_rows(csv.reader(f), root, path)
    if bad:
        raise LabelsError(f"{path}: {named(bad)}")
    return rows


def _label_rows(reader, root: str | os.PathLike[str] | None, path: str | os.PathLike[str]) -> tuple[list[LabelRow], list[str]]:
    """The rows a ``csv.reader`` gives, and what is wrong with the others."""
    header = [c.strip().lower() for c in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise LabelsError(f"{path}: needs a header with 'path' and 'label' columns, found {header}")
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

    A label that is neither, or a path given twice with two labels, is a :class:`LabelsError` naming every
    such row: a label must say one thing a run can count.
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
        raise LabelsError(f"{source}: {named(bad)}")
    return out


def read_labels_csv(path: str | os.PathLike[str], root: str | os.PathLike[str], labels: Sequence[str]) -> dict[str, str]:
    """``path,label`` rows to a mapping from run-relative path to model label; a cell set aside (:data:`EXCLUDE`)
    maps to ``""``, no truth, even in a class-named folder. Paths may be relative to the run's root or absolute."""
    rows = canonical_labels(read_path_labels(path, root), labels, str(path))
    return {p: "" if r.label == EXCLUDE else r.label for p, r in rows.items()}
