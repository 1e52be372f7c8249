"""Where the true label of an input comes from: a class-named parent folder, or a labels CSV."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from ..csv_safety import reading_csv
from ..errors import ExitCode, WbcBatchError


class LabelsError(WbcBatchError):
    """A labels CSV that cannot be used; the message says what is wrong (a usage error: the user gave that file)."""

    exit_code = ExitCode.USAGE


def folder_truth(rel: str, labels: Sequence[str]) -> str:
    """The model label that the file's parent folder is named after (case-insensitive), else ''."""
    parent = PurePosixPath(rel).parent.name
    if not parent:
        return ""
    by_upper = {lb.upper(): lb for lb in labels}
    return by_upper.get(parent.upper(), "")


def truth_function(labels: Sequence[str], table: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """The run's one source of true labels: the labels table first, then the class-named parent folder.

    The orchestrator builds it and hands it to the engine, so every engine (and the
    ``classify()`` API) labels a file the same way.
    """
    lookup = table or {}

    def truth(rel: str) -> str:
        return lookup.get(rel) or folder_truth(rel, labels)

    return truth


def read_labels_csv(path: str | os.PathLike[str], root: str | os.PathLike[str], labels: Sequence[str]) -> dict[str, str]:
    """``path,label`` rows to a mapping from run-relative path to model label.

    Paths may be relative to the run's root or absolute; labels must be the model's
    (case-insensitive). Any problem is a :class:`LabelsError` naming the line.
    """
    by_upper = {lb.upper(): lb for lb in labels}
    root_s = os.path.abspath(root)
    out: dict[str, str] = {}
    with reading_csv(path, LabelsError), open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in fields or "label" not in fields:
            raise LabelsError(f"{path}: needs a header with 'path' and 'label' columns, found {reader.fieldnames}")
        reader.fieldnames = fields
        for line, row in enumerate(reader, start=2):
            p, lb = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not p or not lb:
                raise LabelsError(f"{path}:{line}: empty path or label")
            label = by_upper.get(lb.upper())
            if label is None:
                raise LabelsError(f"{path}:{line}: label {lb!r} is not one of the model's labels {list(labels)}")
            if os.path.isabs(p):
                p = os.path.relpath(p, root_s)
            key = Path(p).as_posix()
            if out.get(key, label) != label:
                raise LabelsError(f"{path}:{line}: {key!r} is labelled twice, as {out[key]!r} and {label!r}")
            out[key] = label
    return out
