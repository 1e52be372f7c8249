"""predictions.csv: the columns, the incremental writer, and reading it back for --resume and reports.

One row per input file. Rows are written a batch at a time with one ``write`` and a flush,
so a killed run leaves at most one torn last line, which :func:`scan_existing` cuts off.
A JSON sidecar (``<csv>.run.json``) names the model that wrote the file, so a resume with
another model is refused.

The file is UTF-8. A file name that is not valid UTF-8 (POSIX allows any bytes) is written
with its original bytes (``surrogateescape``), so the path in the CSV still opens that file
and --resume recognises it. A path that would start a spreadsheet formula is written from ``./``
(:mod:`wbc_batch.csv_safety`), still the same file; the readers here take it back as the path.

--resume keeps only rows a run with this model could have written (:class:`_RowCheck`, one row
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

PROB_PREFIX = "prob_"
#: How undecodable file names (surrogate-escaped by os.scandir) are written and read back.
ENCODING_ERRORS = "surrogateescape"
#: What a NUL byte is read as: Python 3.10's csv reader stops at a NUL ("line contains NUL"), which read as a torn
#: end would cut every row after it; a lone low surrogate that surrogateescape never produces stands in, on every version.
NUL_READ = "\udc00"


class OutputError(WbcBatchError):
    """The output CSV cannot be written or resumed; the message says why."""

    exit_code = ExitCode.OUTPUT


#: Columns written only for a model with a domain check (its metadata's ``domain`` section), after ``confidence``:
#: the review rank (rows.risk), the out-of-domain score and the verdict (``true``/``false``). Older models
#: write exactly the columns they always did.
TRUST_COLUMNS = ["risk", "ood_score", "in_domain"]


def columns(labels: Sequence[str], domain: bool = False) -> list[str]:
    trust = TRUST_COLUMNS if domain else []
    return ["path", "label", "confidence", *trust, *[PROB_PREFIX + lb for lb in labels], "true_label", "status", "error"]


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


def _trust_fields(p: Prediction) -> list[str]:
    if p.ood_score is None or p.risk is None:
        return ["", "", ""]
    return [f"{p.risk:.6f}", f"{p.ood_score:.6f}", "true" if p.in_domain else "false"]


def format_rows(preds: Sequence[Prediction], n_labels: int, domain: bool = False) -> str:
    buf = io.StringIO()
    w = CsvWriter(buf, neutralise=False)  # a machine interface: paths by safe_path, labels and numbers as they are
    empty = [""] * n_labels
    for p in preds:
        probs = [f"{v:.6f}" for v in p.probabilities] if p.probabilities is not None else empty
        conf = f"{p.confidence:.6f}" if p.confidence is not None else ""
        trust = _trust_fields(p) if domain else []
        # The path in a form no spreadsheet runs as a formula (still the same file); the error is text for people.
        w.writerow([safe_path(p.path), p.label, conf, *trust, *probs, p.true_label, p.status, safe_cell(_one_line(p.error))])
    return buf.getvalue()


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


class PredictionWriter:
    """Appends rows; each :meth:`write` is one ``write`` call followed by a flush."""

    def __init__(self, path: str | os.PathLike[str], labels: Sequence[str], *, append: bool = False, domain: bool = False) -> None:
        self.path = Path(path)
        self.labels = list(labels)
        self.domain = domain
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a" if append else "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="")
            if not append or self._f.tell() == 0:
                self._f.write(format_header(self.labels, self.domain))
                self._f.flush()
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e

    def write(self, preds: Sequence[Prediction]) -> None:
        if not preds:
            return
        try:
            self._f.write(format_rows(preds, len(self.labels), self.domain))
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
    buf = io.StringIO()
    CsvWriter(buf, neutralise=False).writerow(columns(labels, domain))
    return buf.getvalue()


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
        width = len(next(records, ([],))[0])
        for rec, _, line in records:
            if len(rec) == width and wanted(plain_path(rec[0])):
                found.setdefault(plain_path(rec[0]), []).append(line)
    return found


def _unit(text: str) -> bool:
    """A probability as the writer formats it: a number from 0 to 1 (nan and text are not)."""
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


def _number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class _RowCheck:
    """What makes a whole record one that a run with this model could have written; :meth:`problem` says why not.

    Why so strict: --resume trusts every row it keeps (it skips their files and counts them in the
    summary), so an edited label, a number that is not one, or a repeated path would be counted as
    if classified. Such a file is refused with the lines to look at, never counted or cut.
    """

    def __init__(self, labels: Sequence[str], domain: bool) -> None:
        cols = columns(labels, domain)
        self.width, self.labels = len(cols), set(labels)
        self.st, self.ti = cols.index("status"), cols.index("true_label")
        self.probs = [(c, i) for i, c in enumerate(cols) if c.startswith(PROB_PREFIX)]
        self.domain = domain
        self.risk, self.ood, self.inside = (cols.index(c) for c in TRUST_COLUMNS) if domain else (-1, -1, -1)
        self.filled = [2, *(i for _, i in self.probs), *((self.risk, self.ood, self.inside) if domain else ())]

    def problem(self, rec: list[str]) -> str | None:
        if len(rec) != self.width:
            return f"{len(rec)} fields instead of {self.width}"
        if not rec[0]:
            return "no path"
        if NUL_READ in rec[0]:
            return "a path with NUL bytes"
        if rec[self.st] not in (STATUS_OK, STATUS_ERROR):
            return f"status {rec[self.st]!r} is neither ok nor error"
        if rec[self.ti] and rec[self.ti] not in self.labels:
            return f"true_label {rec[self.ti]!r} is not one of the model's labels"
        if rec[self.st] == STATUS_ERROR:
            return "an error row with a label, confidence or probabilities" if rec[1] or any(rec[i] for i in self.filled) else None
        return self._ok_problem(rec)

    def _ok_problem(self, rec: list[str]) -> str | None:
        if rec[1] not in self.labels:
            return f"label {rec[1]!r} is not one of the model's labels"
        for name, i in [("confidence", 2), *self.probs, *([("risk", self.risk)] if self.domain else [])]:
            if not _unit(rec[i]):
                return f"{name} {rec[i]!r} is not a number from 0 to 1"
        if self.domain and not _number(rec[self.ood]):
            return f"ood_score {rec[self.ood]!r} is not a number"
        if self.domain and rec[self.inside] not in ("true", "false"):
            return f"in_domain {rec[self.inside]!r} is neither true nor false"
        return None


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
    :class:`_RowCheck`, and a path already seen), makes an OutputError naming the lines.
    """
    expected = columns(labels, domain)
    size = os.path.getsize(path)
    run = ExistingRun(set(), 0, 0, 0, size)
    check, refused = _RowCheck(labels, domain), _Refused()
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
            rel = plain_path(rec[0])
            why = check.problem(rec)
            if why is None and rel in run.done:
                why = ""
            if why is None:
                _count_row(run, rec, rel, check)
                run.good_bytes = end
            elif len(rec) != check.width:
                torn = (line, why, rel)
            else:
                refused.add(line, why, rel)
    if refused.count:
        raise OutputError(_refusal(path, refused))
    run.torn_bytes = size - run.good_bytes
    return run


def _count_row(run: ExistingRun, rec: list[str], rel: str, check: _RowCheck) -> None:
    """Add a whole, valid row to what the resume keeps."""
    ok = rec[check.st] == STATUS_OK
    run.done.add(rel)
    run.ok += ok
    run.errors += not ok
    if ok and rec[check.ti]:
        run.truth_pairs[rec[check.ti], rec[1]] += 1
    run.out_of_domain += check.domain and ok and rec[check.inside] == "false"


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
