"""wbc_batch.inference.orchestrator when things go wrong: a full disk, a bad sidecar, error rows to redo, files gone since."""

from __future__ import annotations

import errno
import io
import json
import shutil

import pytest
from test_orchestrator import JPEG, _cfg, _first_rows, read_rows

from wbc_batch.errors import UsageError
from wbc_batch.inference import predictions
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
