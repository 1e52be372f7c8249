"""CSV cells that a spreadsheet cannot run as formulas: the one rule every CSV wbc-batch writes follows.

Why: labs open predictions.csv, review.csv and differential.csv in a spreadsheet, and their
paths and group names come from file and folder names, which may start with anything. A cell
that starts with ``=``, ``+``, ``-``, ``@``, TAB or CR is read as a formula (OWASP's "CSV
injection"): a folder named ``=HYPERLINK("http://x","open")`` would become a live link.

Two forms, because the CSVs have two kinds of readers:

- the report CSVs (review.csv, differential.csv, per_class.csv) and training's history.csv are
  for people: a text cell that would start a formula gets a leading apostrophe (OWASP's rule),
  which spreadsheets show as text. Plain decimal numbers such as ``-0.5`` are left as they are
  (a spreadsheet reads them as numbers, which cannot run anything).
- predictions.csv is also a machine interface (``--resume``, scripts, ``--labels``): its path
  column must still name the file. A relative path that would start a formula is written as
  ``./`` + path, the same file relative to the input root, and :func:`plain_path` reads it back.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO

#: First characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def starts_formula(text: str) -> bool:
    return text.startswith(FORMULA_STARTS)


def safe_cell(value: object) -> object:
    """``value`` as a report CSV cell: text that would start a formula gets a leading ``'``; numbers stay numbers."""
    text = value if isinstance(value, str) else str(value)
    if starts_formula(text) and not _NUMBER.fullmatch(text):
        return "'" + text
    return value


def safe_row(row: Iterable[object]) -> list[object]:
    """A report CSV row with :func:`safe_cell` applied to every cell."""
    return [safe_cell(v) for v in row]


def safe_path(rel: str) -> str:
    """A run-relative path as predictions.csv writes it: ``./`` first when it would start a formula (still the same file)."""
    return "./" + rel if starts_formula(rel) else rel


def plain_path(cell: str) -> str:
    """The run-relative path a predictions.csv path cell names: :func:`safe_path` undone (a leading ``./`` dropped)."""
    return cell[2:] if cell.startswith("./") else cell


class CsvWriter:
    """The writer of every CSV wbc-batch writes: ``\\n`` line ends, standard quoting, and a field holding a CR quoted too.

    Why the CR: csv quotes a field only for the characters of its own line terminator, so a lone
    ``\\r`` (legal in POSIX file names) would go out bare and split the row for every reader.
    ``neutralise`` (the report CSVs): every cell goes through :func:`safe_cell`; predictions.csv
    passes False and writes its path cells with :func:`safe_path` instead.
    """

    def __init__(self, f: IO[str], *, neutralise: bool = True) -> None:
        self._plain = csv.writer(f, lineterminator="\n")
        self._quoted = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_ALL)
        self.neutralise = neutralise

    def writerow(self, row: Iterable[object]) -> None:
        cells = safe_row(row) if self.neutralise else list(row)
        (self._quoted if any("\r" in c for c in cells if isinstance(c, str)) else self._plain).writerow(cells)

    def writerows(self, rows: Iterable[Iterable[object]]) -> None:
        for row in rows:
            self.writerow(row)


@contextmanager
def reading_csv(path: str | os.PathLike[str], error: type[Exception]) -> Iterator[None]:
    """What can go wrong reading a CSV a person wrote (not UTF-8, malformed, unreadable), as ``error`` naming ``path``:
    the one wording for ``--labels`` and ``--corrections`` files."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason})") from e
    except csv.Error as e:
        raise error(f"{path}: malformed CSV ({e})") from e
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
