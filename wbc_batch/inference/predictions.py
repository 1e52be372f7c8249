"""predictions.csv: the columns, the incremental writer, and reading it back for --resume and reports.

One row per input file. Rows are written a batch at a time with one ``write`` and a flush,
so a killed run leaves at most one torn last line, which :func:`scan_existing` cuts off.
A JSON sidecar (``<csv>.run.json``) names the model that wrote the file, so a resume with
another model is refused.

The file is UTF-8. A file name that is not valid UTF-8 (POSIX allows any bytes) is written
with its original bytes (``surrogateescape``), so the path in the CSV still opens that file
and --resume recognises it. A path that would start a spreadsheet formula is written from ``./``
(:mod:`wbc_batch.csv_safety`), still the same file; the readers here take it back as the path.

--resume keeps only rows a run with this model could have written (:meth:`Schema.problem`, one row
per file); any other row refuses the resume, naming its line, and the file is left as it was.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..csv_safety import CsvWriter, plain_path, safe_cell, safe_path
from ..errors import ExitCode, WbcBatchError
from .rows import STATUS_ERROR, STATUS_OK, Prediction  # the row type lives in rows (engines import it without this writer)

#: The prefix of the probability columns, one per label in the model's order (``prob_<label>``).
PROB_PREFIX = "prob_"
#: How undecodable file names (surrogate-escaped by os.scandir) are written and read back.
ENCODING_ERRORS = "surrogateescape"
#: What a NUL byte is read as: Python 3.10's csv reader stops at a NUL ("line contains NUL"), which read as a torn
#: end would cut every row after it; a lone low surrogate that surrogateescape never produces stands in, on every version.
NUL_READ = "\udc00"


class OutputError(WbcBatchError):
    """The output CSV cannot be written or resumed; the message says why."""

    exit_code = ExitCode.OUTPUT


#: Checks a cell of a record: (column name, cell, the model's labels) -> why no run writes it, or None.
CellCheck = Callable[[str, str, frozenset[str]], str | None]


@dataclass(frozen=True)
class Column:
    """One column of predictions.csv: how a row's cell is written, and what a row a run wrote may hold there.

    ``every`` holds on every row, ``ok`` on ok rows only; ``blank_on_error``: an error row leaves the cell
    empty. Why the checks live with the formatter: --resume trusts the rows it keeps (see :meth:`Schema.problem`),
    so a column is written and read back by one entry of :data:`COLUMNS`.
    """

    name: str
    format: Callable[[Prediction], str]
    every: CellCheck | None = None
    ok: CellCheck | None = None
    blank_on_error: bool = False
    #: Written only for a model with a domain check (its metadata's ``domain`` section); older models write
    #: exactly the columns they always did.
    domain: bool = False


def _fixed(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _checked(p: Prediction) -> bool:
    """The row carries the domain check's answer (an ok row of a model with one): its three columns are written."""
    return p.ood_score is not None and p.risk is not None


def _path(name: str, text: str, labels: frozenset[str]) -> str | None:
    if not text:
        return "no path"
    return "a path with NUL bytes" if NUL_READ in text else None


def _label(name: str, text: str, labels: frozenset[str]) -> str | None:
    return None if text in labels else f"{name} {text!r} is not one of the model's labels"


def _label_or_blank(name: str, text: str, labels: frozenset[str]) -> str | None:
    return _label(name, text, labels) if text else None


def _status(name: str, text: str, labels: frozenset[str]) -> str | None:
    return None if text in (STATUS_OK, STATUS_ERROR) else f"{name} {text!r} is neither ok nor error"


def _unit(name: str, text: str, labels: frozenset[str]) -> str | None:
    """A probability as the writer formats it: a number from 0 to 1 (nan and text are not)."""
    try:
        if 0.0 <= float(text) <= 1.0:
            return None
    except ValueError:
        pass
    return f"{name} {text!r} is not a number from 0 to 1"


def _number(name: str, text: str, labels: frozenset[str]) -> str | None:
    try:
        if math.isfinite(float(text)):
            return None
    except ValueError:
        pass
    return f"{name} {text!r} is not a number"


def _true_false(name: str, text: str, labels: frozenset[str]) -> str | None:
    return None if text in ("true", "false") else f"{name} {text!r} is neither true nor false"


#: Stands in :data:`COLUMNS` for the probability columns, one per label (see :func:`_probability`).
PROBABILITIES = Column(PROB_PREFIX + "<label>", lambda p: "")

#: predictions.csv, column by column: writing (:meth:`Schema.format`), --resume (:meth:`Schema.problem`) and the
#: scans (:meth:`Schema.value`) all read this table, so a column is added here and in the code that computes it.
COLUMNS: tuple[Column, ...] = (
    # The path in a form no spreadsheet runs as a formula (still the same file); read back by Schema.path.
    Column("path", lambda p: safe_path(p.path), every=_path),
    Column("label", lambda p: p.label, ok=_label, blank_on_error=True),
    Column("confidence", lambda p: _fixed(p.confidence), ok=_unit, blank_on_error=True),
    # The review rank (rows.risk), the out-of-domain score and the verdict.
    Column("risk", lambda p: _fixed(p.risk) if _checked(p) else "", ok=_unit, blank_on_error=True, domain=True),
    Column("ood_score", lambda p: _fixed(p.ood_score) if _checked(p) else "", ok=_number, blank_on_error=True, domain=True),
    Column("in_domain", lambda p: ("true" if p.in_domain else "false") if _checked(p) else "", ok=_true_false, blank_on_error=True, domain=True),
    PROBABILITIES,
    Column("true_label", lambda p: p.true_label, every=_label_or_blank),
    Column("status", lambda p: p.status, every=_status),
    # Text for people, on one line.
    Column("error", lambda p: safe_cell(_one_line(p.error))),
)

#: The columns a model with a domain check adds (see Column.domain).
TRUST_COLUMNS = [c.name for c in COLUMNS if c.domain]


def _probability(i: int, label: str) -> Column:
    return Column(
        PROB_PREFIX + label, lambda p: "" if p.probabilities is None else f"{p.probabilities[i]:.6f}", ok=_unit, blank_on_error=True
    )


@dataclass(frozen=True)
class Schema:
    """The columns of one model's predictions.csv (its labels, its domain check or none), and where each is in a record.

    Records are read by name through it (:meth:`value`, :meth:`path`, :meth:`status`), never by position.
    """

    labels: tuple[str, ...]
    domain: bool = False
    columns: tuple[Column, ...] = field(init=False)
    _at: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cols: list[Column] = []
        for c in COLUMNS:
            if c is PROBABILITIES:
                cols += [_probability(i, lb) for i, lb in enumerate(self.labels)]
            elif self.domain or not c.domain:
                cols.append(c)
        object.__setattr__(self, "columns", tuple(cols))
        object.__setattr__(self, "_at", {c.name: i for i, c in enumerate(cols)})

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def value(self, rec: Sequence[str], name: str) -> str:
        return rec[self._at[name]]

    def path(self, rec: Sequence[str]) -> str:
        """The file's run-relative path (a ``./`` form written against formulas read back)."""
        return plain_path(self.value(rec, "path"))

    def status(self, rec: Sequence[str]) -> str:
        return self.value(rec, "status")

    def header(self) -> str:
        buf = io.StringIO()
        CsvWriter(buf, neutralise=False).writerow(self.names)
        return buf.getvalue()

    def format(self, preds: Sequence[Prediction]) -> str:
        """The CSV text of ``preds``, one line (record) each."""
        buf = io.StringIO()
        w = CsvWriter(buf, neutralise=False)  # a machine interface: each column formats its own cell (Column.format)
        for p in preds:
            w.writerow([c.format(p) for c in self.columns])
        return buf.getvalue()

    def problem(self, rec: list[str]) -> str | None:
        """Why a whole record is not one that a run with this model could have written (None when it is).

        Why so strict: --resume trusts every row it keeps (it skips their files and counts them in the
        summary), so an edited label, a number that is not one, or a repeated path would be counted as
        if classified. The first problem in column order is named.
        """
        if len(rec) != len(self.columns):
            return f"{len(rec)} fields instead of {len(self.columns)}"
        labels = frozenset(self.labels)
        cells = list(zip(self.columns, rec, strict=True))
        for c, text in cells:
            if c.every is not None and (why := c.every(c.name, text, labels)):
                return why
        if self.status(rec) == STATUS_ERROR:
            blank = all(not text for c, text in cells if c.blank_on_error)
            return None if blank else "an error row with a label, confidence or probabilities"
        for c, text in cells:
            if c.ok is not None and (why := c.ok(c.name, text, labels)):
                return why
        return None


def columns(labels: Sequence[str], domain: bool = False) -> list[str]:
    return Schema(tuple(labels), domain).names


def companion_path(csv_path: str | os.PathLike[str], suffix: str) -> Path:
    """``<csv><suffix>`` beside the file ``csv_path`` resolves to, so every spelling of one output (a symlink to it,
    a symlinked folder, ``..`` on the way) names one lock file and one sidecar.

    An output that exists and is no regular file (``/dev/full``, a FIFO) keeps its companions beside the
    name given: nothing can be made in ``/dev``, and such an output holds no rows to protect.
    """
    real = os.path.realpath(csv_path)
    if os.path.exists(real) and not os.path.isfile(real):
        given = os.path.abspath(csv_path)
        real = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
    return Path(real + suffix)


def sidecar_path(csv_path: str | os.PathLike[str]) -> Path:
    return companion_path(csv_path, ".run.json")


def format_rows(preds: Sequence[Prediction], labels: Sequence[str], domain: bool = False) -> str:
    return Schema(tuple(labels), domain).format(preds)


class PredictionWriter:
    """Appends rows; each :meth:`write` is one ``write`` call followed by a flush."""

    def __init__(self, path: str | os.PathLike[str], labels: Sequence[str], *, append: bool = False, domain: bool = False) -> None:
        self.path = Path(path)
        self.labels = list(labels)
        self.domain = domain
        self.schema = Schema(tuple(labels), domain)
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a" if append else "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="")
            if not append or self._f.tell() == 0:
                self._f.write(self.schema.header())
                self._f.flush()
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e

    def write(self, preds: Sequence[Prediction]) -> None:
        if not preds:
            return
        try:
            self._f.write(self.schema.format(preds))
            self._f.flush()
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e

    def close(self) -> None:
        """Flush, sync and close; OutputError when the last rows cannot reach the disk (full, I/O error).

        The file is closed in every case. What reached the disk before stays (whole rows, and at
        most one torn line that --resume cuts off).
        """
        if self._f.closed:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            _close_quietly(self._f)
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e
        self._f.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(f: io.TextIOWrapper) -> None:
    """Close ``f`` although its buffer cannot be written (a full disk): the unwritten tail is dropped."""
    try:
        f.close()
    except OSError:
        try:
            os.close(f.fileno())
        except (OSError, ValueError):
            pass


def format_header(labels: Sequence[str], domain: bool = False) -> str:
    return Schema(tuple(labels), domain).header()


@dataclass
class ExistingRun:
    done: set[str]
    ok: int
    errors: int
    good_bytes: int  # length of the intact prefix (header + whole rows)
    torn_bytes: int  # bytes after it that a kill left behind
    truth_pairs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (true, predicted) of ok rows with a true label
    out_of_domain: int = 0  # ok rows with in_domain=false (a model with a domain check)


def _records_with_offsets(f: io.BufferedReader) -> Iterator[tuple[list[str], int, int]]:
    """Whole CSV records with the byte offset just after each and the line it starts on (quoted multi-line fields allowed).

    A record is whole only when its last line ends with a newline: a kill mid-write leaves
    a final line without one, which is not yielded. Lines are counted at newlines (as ``sed -n Np``
    counts them), so a message can name the line to look at.
    """
    offset = 0
    n_lines = 0
    complete = True

    def lines() -> Iterator[str]:
        nonlocal offset, complete, n_lines
        for raw in f:
            offset += len(raw)
            n_lines += 1
            complete = raw.endswith(b"\n")
            yield raw.decode("utf-8", errors=ENCODING_ERRORS).replace("\0", NUL_READ)

    reader = csv.reader(lines(), strict=True)
    while True:
        first_line = n_lines + 1
        try:
            rec = next(reader)
        except (StopIteration, csv.Error):
            return  # end of file, or a torn quoted field at the end
        if not complete:
            return
        yield rec, offset, first_line


def path_lines(path: str | os.PathLike[str], wanted: Callable[[str], bool]) -> dict[str, list[int]]:
    """The lines of the rows (as wide as the header) whose path ``wanted`` picks, by path (``./`` forms read back).

    Kept out of the scans' single pass so that they hold no line number per row: it runs only
    when a scan found something to name.
    """
    found: dict[str, list[int]] = {}
    with open(path, "rb") as f:
        records = _records_with_offsets(f)
        header = next(records, ([],))[0]
        if "path" not in header:
            return found
        at = header.index("path")
        for rec, _, line in records:
            if len(rec) == len(header) and wanted(rel := plain_path(rec[at])):
                found.setdefault(rel, []).append(line)
    return found


#: How many refused rows a message names (the count says how many more there are).
SHOWN_PROBLEMS = 10


@dataclass
class _Refused:
    """The rows a resume refuses: how many, and the first :data:`SHOWN_PROBLEMS` as (line, why, path); why "" = a repeated path."""

    count: int = 0
    shown: list[tuple[int, str, str]] = field(default_factory=list)

    def add(self, line: int, why: str, rel: str) -> None:
        self.count += 1
        if len(self.shown) < SHOWN_PROBLEMS:
            self.shown.append((line, why, rel))


def scan_existing(path: str | os.PathLike[str], labels: Sequence[str], domain: bool = False) -> ExistingRun:
    """Read a predictions CSV for --resume: the finished paths and where the intact part ends.

    ``domain``: the model has a domain check, so the CSV must have its columns (and an old CSV without
    them is refused, like any other header that is not this model's). A record too short or too long
    is a torn write when it is the last one; anywhere else it, and every row that no run writes (see
    :meth:`Schema.problem`, and a path already seen), makes an OutputError naming the lines.
    """
    schema = Schema(tuple(labels), domain)
    expected = schema.names
    size = os.path.getsize(path)
    run = ExistingRun(set(), 0, 0, 0, size)
    refused = _Refused()
    torn: tuple[int, str, str] | None = None  # a record of the wrong width: a torn write if nothing follows it
    with open(path, "rb") as f:
        records = _records_with_offsets(f)
        first = next(records, None)
        if first is None:
            return run
        header, run.good_bytes, _ = first
        if header != expected:
            raise OutputError(
                f"{path} has columns {header[:6]}... which do not match this model's {expected[:6]}...: "
                "it was written by a different model (or is not a predictions file)"
            )
        for rec, end, line in records:
            if torn is not None:
                refused.add(*torn)
                torn = None
            why = schema.problem(rec)
            rel = schema.path(rec) if len(rec) == len(expected) else ""  # a torn record's path is never looked up
            if why is None and rel in run.done:
                why = ""
            if why is None:
                _count_row(run, rec, rel, schema)
                run.good_bytes = end
            elif len(rec) != len(expected):
                torn = (line, why, rel)
            else:
                refused.add(line, why, rel)
    if refused.count:
        raise OutputError(_refusal(path, refused))
    run.torn_bytes = size - run.good_bytes
    return run


def _count_row(run: ExistingRun, rec: list[str], rel: str, schema: Schema) -> None:
    """Add a whole, valid row to what the resume keeps."""
    ok = schema.status(rec) == STATUS_OK
    run.done.add(rel)
    run.ok += ok
    run.errors += not ok
    if ok and (truth := schema.value(rec, "true_label")):
        run.truth_pairs[truth, schema.value(rec, "label")] += 1
    run.out_of_domain += schema.domain and ok and schema.value(rec, "in_domain") == "false"


def _refusal(path: str | os.PathLike[str], refused: _Refused) -> str:
    """The message of a refused resume: the first lines and why each is not a run's row, then what to do."""
    repeated = {rel for _, why, rel in refused.shown if not why}
    first = {rel: lines[0] for rel, lines in path_lines(path, repeated.__contains__).items()} if repeated else {}
    named = [f"line {line}: {why or f'{rel!r} again (first on line {first[rel]})'}" for line, why, rel in refused.shown]
    more = [f"and {refused.count - len(refused.shown)} more"] if refused.count > len(refused.shown) else []
    return (
        f"cannot resume: {path} has {refused.count} row(s) that no wbc-batch run writes: {'; '.join(named + more)}; "
        "remove or correct those lines, or write to a new CSV (or --overwrite to classify everything again)"
    )


def truncate_torn_tail(path: str | os.PathLike[str], good_bytes: int) -> None:
    """Cut what a kill left after the last whole row; OutputError (exit 5) when the file cannot be changed."""
    try:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    except OSError as e:
        raise OutputError(f"cannot cut the torn last line of {path}: {e.strerror or e}") from e


def write_sidecar(csv_path: str | os.PathLike[str], info: dict) -> None:
    """Atomically (write + rename) store the run description beside the CSV."""
    p = sidecar_path(csv_path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written description behind
        raise OutputError(f"cannot write {p}: {e.strerror or e}") from e


def read_sidecar(csv_path: str | os.PathLike[str]) -> dict | None:
    """The run description beside ``csv_path`` (None when there is none); OutputError when it is unreadable or not one."""
    p = sidecar_path(csv_path)
    if not p.exists():
        return None
    try:
        side = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{p} is unreadable ({e}); remove it or write to a new CSV") from e
    if not _is_run_description(side):
        raise OutputError(f"{p} is not a wbc-batch run description (valid JSON of another shape); remove it or write to a new CSV")
    return side


def _is_run_description(side: object) -> bool:
    """The shape its readers rely on: an object whose ``model`` is an object (its sha256 a string), and a string (or no) root."""
    if not isinstance(side, dict) or not isinstance(side.get("model"), dict):
        return False
    return isinstance(side["model"].get("sha256", ""), str) and isinstance(side.get("root", ""), (str, type(None)))


def drop_rows(
    path: str | os.PathLike[str], drop: Callable[[list[str]], bool], before_replace: Callable[[], None] | None = None
) -> list[list[str]]:
    """Rewrite ``path`` without the records ``drop`` picks (header and every other row byte for byte); returns those dropped.

    For ``--retry-errors`` (error rows go, to be redone) and for rows of files that are gone. The
    new file replaces the old one atomically, so a kill mid-way leaves one or the other, and so does a
    full disk (OutputError, exit 5; the partial copy is removed). ``before_replace`` runs once the new
    file is complete, just before it takes the old one's place (the caller marks the sidecar there);
    if it raises, the old file stays.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".rewrite.tmp")
    dropped: list[list[str]] = []
    try:
        with open(path, "rb") as f, open(path, "rb") as raw, open(tmp, "wb") as out:
            at = 0
            for i, (rec, end, _) in enumerate(_records_with_offsets(f)):
                chunk = raw.read(end - at)
                at = end
                if i and drop(rec):
                    dropped.append(rec)
                else:
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot rewrite {path}: {e.strerror or e}") from e
        raise
    return dropped
