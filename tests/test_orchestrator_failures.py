"""wbc_batch.inference.orchestrator when things go wrong: a full disk, a bad sidecar, error rows to redo, files gone since."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_orchestrator import JPEG, _cfg, _first_rows, read_rows

from wbc_batch.errors import UsageError
from wbc_batch.inference import orchestrator, predictions
from wbc_batch.inference.orchestrator import run_classify
from wbc_batch.inference.output_guard import lock_path, output_lock
from wbc_batch.inference.predictions import OutputError, sidecar_path


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes and then fails every write with ENOSPC, as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            n = self.f.write(bytes(b[: self.room]))
            self.room = 0
            if n:
                return n
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(bytes(b))

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


def _fill_disk_after(monkeypatch, csv_path, room: int) -> None:
    real_open = open

    def fake_open(file, mode="r", *args, encoding=None, errors=None, newline=None, **kw):
        if str(file) == str(csv_path) and mode in ("w", "a"):
            raw = _FullDisk(real_open(file, mode + "b", buffering=0), room)
            return io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding, errors=errors, newline=newline)
        return real_open(file, mode, *args, encoding=encoding, errors=errors, newline=newline, **kw)

    monkeypatch.setattr(predictions, "open", fake_open, raising=False)


def test_a_disk_that_fills_mid_run_is_an_output_error_and_the_rows_before_are_kept(tmp_path, color_model, sample_copy, monkeypatch):
    full = tmp_path / "full.csv"
    run_classify(_cfg([sample_copy], full, color_model))
    out = tmp_path / "p.csv"
    _fill_disk_after(monkeypatch, out, room=1500)  # the header and a few batches
    with pytest.raises(OutputError, match=r"cannot write .*p\.csv: No space left on device") as e:
        run_classify(_cfg([sample_copy], out, color_model))
    assert e.value.exit_code == 5
    side = json.loads(sidecar_path(out).read_text())
    assert side["state"] == "failed" and "No space left on device" in side["error"]
    kept = out.read_bytes()
    assert 0 < len(kept) <= 1500 and full.read_bytes().startswith(kept)  # whole rows, perhaps one torn line
    monkeypatch.undo()  # space freed: the run resumes to the uninterrupted result
    run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert out.read_text() == full.read_text()


@pytest.mark.parametrize("text", ["[]", '{"model": "x"}', '{"model": {"sha256": 5}}', '{"model": {"sha256": "ab"}, "root": 3}'])
def test_a_sidecar_of_the_wrong_shape_is_an_output_error(tmp_path, color_model, sample_copy, text):
    out = _first_rows(tmp_path, color_model, sample_copy, 1)
    sidecar_path(out).write_text(text)
    before = out.read_bytes()
    with pytest.raises(OutputError, match=r"p\.csv\.run\.json is not a wbc-batch run description \(valid JSON of another shape\)") as e:
        run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert e.value.exit_code == 5 and out.read_bytes() == before


def test_a_sidecar_that_cannot_be_written_at_the_end_is_an_output_error(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"

    def block_sidecar(preds):
        side = sidecar_path(out)
        if side.is_file():
            side.unlink()
            side.mkdir()  # the final write cannot replace a folder

    with pytest.raises(OutputError, match=r"cannot write .*p\.csv\.run\.json"):
        run_classify(_cfg([sample_copy], out, color_model), on_batch=block_sidecar)
    assert len(read_rows(out)) == 40  # the rows are all there


def test_resume_retry_errors_redoes_the_error_rows(tmp_path, color_model, sample_copy):
    bad = sample_copy / "NEUTROPHIL" / "zz_later.jpeg"
    bad.write_bytes(b"")  # empty now; a good image by the retry
    out = tmp_path / "p.csv"
    s = run_classify(_cfg([sample_copy], out, color_model))
    assert (s.ok, s.errors) == (40, 1)
    shutil.copy(JPEG, bad)
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert (s.processed, s.errors) == (0, 1)  # a plain resume keeps error rows
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True, retry_errors=True))
    assert (s.resumed, s.processed, s.files, s.ok, s.errors) == (40, 1, 41, 41, 0)
    rows = read_rows(out)
    assert len(rows) == len({r["path"] for r in rows}) == 41 and all(r["status"] == "ok" for r in rows)
    assert rows[-1]["path"] == "NEUTROPHIL/zz_later.jpeg"
    with pytest.raises(UsageError, match="--retry-errors only applies with --resume"):
        _cfg([sample_copy], out, color_model, retry_errors=True)


def test_resume_drops_the_rows_of_files_deleted_since(tmp_path, color_model, sample_copy):
    out = _first_rows(tmp_path, color_model, sample_copy, 2)  # 8 rows
    gone = [r["path"] for r in read_rows(out)[:3]]
    for rel in gone:
        (sample_copy / rel).unlink()
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True))
    rows = read_rows(out)
    assert not set(gone) & {r["path"] for r in rows}
    assert (s.stale, s.resumed, s.processed, s.files) == (3, 5, 32, 37) and len(rows) == 37
    assert json.loads(sidecar_path(out).read_text())["summary"]["stale"] == 3


def test_a_run_holds_its_output_lock_and_refuses_a_second(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    with output_lock(out):
        with pytest.raises(OutputError, match=rf"p\.csv is in use by another wbc-batch run \(pid {__import__('os').getpid()}\)") as e:
            run_classify(_cfg([sample_copy], out, color_model))
        assert e.value.exit_code == 5 and not out.exists()
    assert not lock_path(out).exists()
    lock_path(out).write_text("12345\n")  # left by a run that died: no process holds it
    run_classify(_cfg([sample_copy], out, color_model))
    assert len(read_rows(out)) == 40 and not lock_path(out).exists()


# -- start-up: the writes before the first row, and a stop before the run's loop ------------------------------
def _previous_run(tmp_path, color_model, sample_copy, bad: bool = False) -> tuple[Path, dict[Path, bytes]]:
    """A finished run's CSV (with one error row if ``bad``) and the bytes of everything beside it."""
    if bad:
        (sample_copy / "NEUTROPHIL" / "zz_bad.jpeg").write_bytes(b"")
    out = tmp_path / "p.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    return out, {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}


def _files(tmp_path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}


def _fail_writes(monkeypatch, suffix: str, mode: str, err: int) -> None:
    """Opening a file named ``*suffix`` in ``mode`` (in predictions) creates it, but its writes fail with ``err``."""
    real_open = open

    def fake_open(file, m="r", *args, **kw):
        if str(file).endswith(suffix) and m == mode:
            f = real_open(file, m, *args, **kw)
            f.close()
            raise OSError(err, os.strerror(err))
        return real_open(file, m, *args, **kw)

    monkeypatch.setattr(predictions, "open", fake_open, raising=False)


def test_a_sidecar_that_cannot_be_written_at_start_up_changes_nothing(tmp_path, color_model, sample_copy, monkeypatch):
    out, before = _previous_run(tmp_path, color_model, sample_copy)
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.endswith(".run.json.tmp"):
            real(self, "")  # created, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=r"cannot write .*p\.csv\.run\.json: No space left on device") as e:
        run_classify(_cfg([sample_copy], out, color_model, overwrite=True))
    assert e.value.exit_code == 5 and _files(tmp_path) == before


@pytest.mark.parametrize(("suffix", "mode", "err", "message"), [
    (".rewrite.tmp", "wb", errno.ENOSPC, r"cannot rewrite .*p\.csv: No space left on device"),
    (".csv", "r+b", errno.EIO, r"cannot cut the torn last line of .*p\.csv: Input/output error"),
])
def test_a_resume_that_cannot_rewrite_its_csv_is_an_output_error(tmp_path, color_model, sample_copy, monkeypatch, suffix, mode, err, message):
    out, _ = _previous_run(tmp_path, color_model, sample_copy, bad=True)
    with open(out, "ab") as f:
        f.write(b"torn,li")  # a kill mid-write: the resume cuts it
    before = _files(tmp_path)
    _fail_writes(monkeypatch, suffix, mode, err)
    with pytest.raises(OutputError, match=message) as e:
        run_classify(_cfg([sample_copy], out, color_model, resume=True, retry_errors=True))
    assert e.value.exit_code == 5
    assert {p: b for p, b in _files(tmp_path).items() if p.name != "p.csv"} == {p: b for p, b in before.items() if p.name != "p.csv"}
    assert out.read_bytes() in (before[out], before[out][: -len(b"torn,li")])  # the cut, if it was made, only


def _signal_at(monkeypatch, module, name: str, signum: int) -> list[int]:
    """Send ``signum`` to this process as ``module.name`` is first called; the returned list counts the calls."""
    real, calls = getattr(module, name), []

    def send(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(module, name, send)
    return calls


class _Signalled(Exception):
    """What SIGINT and SIGTERM raise in these tests outside the run's own handlers (the defaults would end pytest)."""


@pytest.fixture
def signals_raise():
    def handler(signum, frame):
        raise _Signalled(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("where", ["load_model", "iter_images", "refuse_input_as_output"])
def test_a_stop_before_the_output_is_touched_leaves_it_and_its_sidecar_as_they_were(
    tmp_path, color_model, sample_copy, monkeypatch, signals_raise, where, signum
):
    out, before = _previous_run(tmp_path, color_model, sample_copy)
    _signal_at(monkeypatch, orchestrator, where, signum)
    s = run_classify(_cfg([sample_copy], out, color_model, overwrite=True))
    assert (s.interrupted, s.signal, s.processed, s.files) == (True, signum, 0, 0)
    assert _files(tmp_path) == before  # no lock file left, CSV and sidecar as they were


@pytest.mark.parametrize(("where", "resume"), [("write_sidecar", False), ("write_sidecar", True), ("drop_rows", True)])
def test_a_stop_while_the_output_is_prepared_ends_the_run_as_interrupted(tmp_path, color_model, sample_copy, monkeypatch, signals_raise, where, resume):
    out, _ = _previous_run(tmp_path, color_model, sample_copy, bad=True)
    if resume:
        predictions.drop_rows(out, lambda rec: rec[0].startswith("NEUTROPHIL/") and rec[-2] == "ok")  # 10 to do; the bad one's row to redo
    _signal_at(monkeypatch, orchestrator, where, signal.SIGINT)
    s = run_classify(_cfg([sample_copy], out, color_model, overwrite=not resume, resume=resume, retry_errors=resume))
    rows = read_rows(out)
    assert (s.interrupted, s.signal, s.processed, s.files, s.resumed) == (True, signal.SIGINT, 0, len(rows), len(rows))
    assert len(rows) == (30 if resume else 0) and all(r["status"] == "ok" for r in rows)
    side = json.loads(sidecar_path(out).read_text())
    assert side["state"] == "interrupted" and side["summary"]["files"] == len(rows)
    assert not lock_path(out).exists()


def test_resume_drops_the_row_of_a_deleted_file_whose_name_would_start_a_formula(tmp_path, color_model, sample_copy):
    gone = sample_copy / "EOSINOPHIL" / "=gone.jpeg"
    shutil.copy(JPEG, gone)
    out = tmp_path / "p.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    assert "./EOSINOPHIL" not in out.read_text() and len(read_rows(out)) == 41
    top = sample_copy / "-top.jpeg"
    shutil.copy(JPEG, top)
    run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert read_rows(out)[-1]["path"] == "./-top.jpeg"
    top.unlink()
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert s.stale == 1 and "./-top.jpeg" not in {r["path"] for r in read_rows(out)} and len(read_rows(out)) == 41


def _error_row_run(tmp_path, color_model, sample_copy):
    """A finished run with one error row whose file is a good image by now."""
    bad = sample_copy / "NEUTROPHIL" / "zz_later.jpeg"
    bad.write_bytes(b"")
    out = tmp_path / "p.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    shutil.copy(JPEG, bad)
    return out


def test_a_kill_after_retry_errors_dropped_the_rows_leaves_a_sidecar_that_does_not_say_finished(tmp_path, color_model, sample_copy, monkeypatch):
    out = _error_row_run(tmp_path, color_model, sample_copy)
    assert json.loads(sidecar_path(out).read_text())["state"] == "finished"
    real_drop = orchestrator.drop_rows

    def drop_then_die(path, drop, **kw):
        real_drop(path, drop, **kw)
        raise SystemExit("killed")  # the process ends here, as a SIGKILL would end it

    monkeypatch.setattr(orchestrator, "drop_rows", drop_then_die)
    with pytest.raises(SystemExit):
        run_classify(_cfg([sample_copy], out, color_model, resume=True, retry_errors=True))
    assert len(read_rows(out)) == 40  # the error row is gone ...
    side = json.loads(sidecar_path(out).read_text())
    assert side["state"] == "running" and "summary" not in side  # ... and the sidecar does not claim the old 41 as finished
    monkeypatch.undo()
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert (s.resumed, s.processed, s.files, s.errors) == (40, 1, 41, 0)


def test_a_kill_while_stale_rows_are_dropped_leaves_a_sidecar_that_does_not_say_finished(tmp_path, color_model, sample_copy, monkeypatch):
    out = tmp_path / "p.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    (sample_copy / read_rows(out)[0]["path"]).unlink()
    real_drop = orchestrator.drop_rows

    def drop_then_die(path, drop, **kw):
        real_drop(path, drop, **kw)
        raise SystemExit("killed")

    monkeypatch.setattr(orchestrator, "drop_rows", drop_then_die)
    with pytest.raises(SystemExit):
        run_classify(_cfg([sample_copy], out, color_model, resume=True))
    side = json.loads(sidecar_path(out).read_text())
    assert len(read_rows(out)) == 39 and side["state"] == "running" and "summary" not in side and "finished" not in side
