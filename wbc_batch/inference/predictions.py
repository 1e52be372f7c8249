"""predictions.csv: the columns, the incremental writer, and reading it back for --resume and reports.

One row per input file. Rows are written a batch at a time with one ``write`` and a flush,
so a killed run leaves at most one torn last line, which :func:`scan_existing` cuts off.
A JSON sidecar (``<csv>.run.json``) names the model that wrote the file, so a resume with
another model is refused.

The file is UTF-8. A file name that is not valid UTF-8 (POSIX allows any bytes) is written
with its original bytes (``surrogateescape``), so the path in the CSV still opens that file
and --resume recognises it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExitCode, WbcBatchError
from .rows import STATUS_ERROR, STATUS_OK, Prediction  # the row type lives in rows (engines import it without this writer)

PROB_PREFIX = "prob_"
#: How undecodable file names (surrogate-escaped by os.scandir) are written and read back.
ENCODING_ERRORS = "surrogateescape"


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


def sidecar_path(csv_path: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(csv_path) + ".run.json")


def _trust_fields(p: Prediction) -> list[str]:
    if p.ood_score is None or p.risk is None:
        return ["", "", ""]
    return [f"{p.risk:.6f}", f"{p.ood_score:.6f}", "true" if p.in_domain else "false"]


def format_rows(preds: Sequence[Prediction], n_labels: int, domain: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # csv quotes a field only for the characters of its own line terminator, so a lone "\r"
    # (legal in POSIX file names) would go out bare and split the row for every reader.
    w_cr = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    empty = [""] * n_labels
    for p in preds:
        probs = [f"{v:.6f}" for v in p.probabilities] if p.probabilities is not None else empty
        conf = f"{p.confidence:.6f}" if p.confidence is not None else ""
        trust = _trust_fields(p) if domain else []
        (w_cr if "\r" in p.path else w).writerow([p.path, p.label, conf, *trust, *probs, p.true_label, p.status, _one_line(p.error)])
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
    csv.writer(buf, lineterminator="\n").writerow(columns(labels, domain))
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


def _records_with_offsets(f: io.BufferedReader) -> Iterator[tuple[list[str], int]]:
    """Whole CSV records with the byte offset just after each (quoted multi-line fields allowed).

    A record is whole only when its last line ends with a newline: a kill mid-write leaves
    a final line without one, which is not yielded.
    """
    offset = 0
    complete = True

    def lines() -> Iterator[str]:
        nonlocal offset, complete
        for raw in f:
            offset += len(raw)
            complete = raw.endswith(b"\n")
            yield raw.decode("utf-8", errors=ENCODING_ERRORS)

    reader = csv.reader(lines(), strict=True)
    while True:
        try:
            rec = next(reader)
        except (StopIteration, csv.Error):
            return  # end of file, or a torn quoted field at the end
        if not complete:
            return
        yield rec, offset


def scan_existing(path: str | os.PathLike[str], labels: Sequence[str], domain: bool = False) -> ExistingRun:
    """Read a predictions CSV for --resume: the finished paths and where the intact part ends.

    ``domain``: the model has a domain check, so the CSV must have its columns (and an old CSV without
    them is refused, like any other header that is not this model's).
    """
    expected = columns(labels, domain)
    i_in = expected.index("in_domain") if domain else -1
    n, st, ti = len(expected), expected.index("status"), expected.index("true_label")
    size = os.path.getsize(path)
    done: set[str] = set()
    pairs: Counter[tuple[str, str]] = Counter()
    ok = errors = good = outside = 0
    with open(path, "rb") as f:
        records = _records_with_offsets(f)
        first = next(records, None)
        if first is None:
            return ExistingRun(done, 0, 0, 0, size)
        header, good = first
        if header != expected:
            raise OutputError(
                f"{path} has columns {header[:6]}... which do not match this model's {expected[:6]}...: "
                "it was written by a different model (or is not a predictions file)"
            )
        for rec, end in records:
            if len(rec) != n or rec[st] not in (STATUS_OK, STATUS_ERROR):
                break
            done.add(rec[0])
            ok += rec[st] == STATUS_OK
            errors += rec[st] == STATUS_ERROR
            if rec[st] == STATUS_OK and rec[ti]:
                pairs[rec[ti], rec[1]] += 1
            outside += domain and rec[st] == STATUS_OK and rec[i_in] == "false"
            good = end
    return ExistingRun(done, ok, errors, good, size - good, pairs, outside)


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


def drop_rows(path: str | os.PathLike[str], drop: Callable[[list[str]], bool]) -> list[list[str]]:
    """Rewrite ``path`` without the records ``drop`` picks (header and every other row byte for byte); returns those dropped.

    For ``--retry-errors`` (error rows go, to be redone) and for rows of files that are gone. The
    new file replaces the old one atomically, so a kill mid-way leaves one or the other, and so does a
    full disk (OutputError, exit 5; the partial copy is removed).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".rewrite.tmp")
    dropped: list[list[str]] = []
    try:
        with open(path, "rb") as f, open(path, "rb") as raw, open(tmp, "wb") as out:
            at = 0
            for i, (rec, end) in enumerate(_records_with_offsets(f)):
                chunk = raw.read(end - at)
                at = end
                if i and drop(rec):
                    dropped.append(rec)
                else:
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot rewrite {path}: {e.strerror or e}") from e
    return dropped
