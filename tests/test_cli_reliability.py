"""The failure paths of a real ``python -m wbc_batch classify`` run: signals, kills, two runs, a full disk.

Each test drives a real subprocess (real signals, real worker processes), because these are the
paths that in-process tests cannot reach: a handler that hangs on its workers, orphans after a
kill, two processes writing one CSV.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE
from test_cli import ENV, _cli, _data_lines, _many_inputs, classify
from test_orchestrator import read_rows

from wbc_batch.inference.model import default_model_path
from wbc_batch.inference.predictions import sidecar_path

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")


def _start(inputs: Path, out: Path, model: Path, *extra) -> subprocess.Popen:
    """A run in its own process group (so the test can see, and at the end kill, everything it started)."""
    cmd = _cli(inputs, "-o", out, "-m", model, "--batch-size", "2", *extra)
    return subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.monotonic() + 60
    while proc.poll() is None and _data_lines(out) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the test could act on it"
    assert _data_lines(out) >= n


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _cleanup(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def many(tmp_path) -> Path:
    _many_inputs(tmp_path / "in", 10)  # 400 files: a run long enough to be signalled mid-way
    return tmp_path / "in"


@pytest.mark.slow
@pytest.mark.parametrize(("signals", "code"), [((signal.SIGINT,), 130), ((signal.SIGINT,) * 3, 130), ((signal.SIGTERM,), 143), ((signal.SIGTERM, signal.SIGINT), 143)])
def test_signals_stop_the_run_cleanly_and_promptly(tmp_path, color_model, many, signals, code):
    out = tmp_path / "p.csv"
    proc = _start(many, out, color_model, "--workers", "2", "-q")
    try:
        _wait_rows(proc, out, 20)
        t0 = time.monotonic()
        for s in signals:
            os.kill(proc.pid, s)
            time.sleep(0.1)
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - t0
        assert proc.returncode == code, err
        assert took < 5, took
        assert "rerun the same command with --resume" in err and "Traceback" not in err
        assert _group_gone_within(proc.pid, 5), "worker processes outlived the run"
    finally:
        _cleanup(proc)
    side = json.loads(sidecar_path(out).read_text())
    assert side["state"] == "interrupted"
    assert out.read_bytes().endswith(b"\n")  # whole rows only
    assert side["summary"]["files"] == len(read_rows(out))
    if signals != (signal.SIGTERM,):
        return  # the resume after a stop is the same for every signal: checked once
    r = subprocess.run(_cli(many, "-o", out, "-m", color_model, "--resume", "-q", "--workers", "1", "--batch-size", "64"), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert len(rows) == len({r["path"] for r in rows}) == 400


@pytest.mark.slow
def test_sigkill_of_the_main_process_leaves_no_workers(tmp_path, color_model, many):
    out = tmp_path / "p.csv"
    proc = _start(many, out, color_model, "--workers", "2", "-q")
    try:
        _wait_rows(proc, out, 20)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _group_gone_within(proc.pid, 5), "worker processes (or the resource tracker) outlived a killed run"
    finally:
        _cleanup(proc)


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_and_a_stale_lock_is_taken_over(tmp_path, color_model):
    many = tmp_path / "many"
    n = _many_inputs(many, 10)
    out = tmp_path / "p.csv"
    first = _start(many, out, color_model, "--workers", "2", "-q")
    try:
        _wait_rows(first, out, 10)
        os.kill(first.pid, signal.SIGSTOP)  # mid-run, holding its lock, for as long as the test needs
        for extra in (["--resume"], ["--overwrite"]):
            r = subprocess.run(_cli(many, "-o", out, "-m", color_model, "-q", *extra), env=ENV, capture_output=True, text=True, timeout=60)
            assert r.returncode == 5, r.stderr
            assert f"is in use by another wbc-batch run (pid {first.pid})" in r.stderr
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        _cleanup(first)
    resume = _cli(many, "-o", out, "-m", color_model, "-q", "--resume", "--workers", "1", "--batch-size", "64")
    r = subprocess.run(resume, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert len(rows) == len({r["path"] for r in rows}) == n


def test_a_full_disk_is_exit_5_with_a_message(tmp_path, color_model, sample_copy):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out = tmp_path / "p.csv"
    out.symlink_to("/dev/full")  # every write to the CSV fails with ENOSPC, as on a full disk
    r = classify(sample_copy, out, color_model, "--overwrite")
    assert r.exit_code == 5, r.output
    assert "No space left on device" in r.output and "Traceback" not in r.output
    assert json.loads(sidecar_path(out).read_text())["state"] == "failed"


def test_an_output_that_is_one_of_the_inputs_is_refused_even_with_overwrite(tmp_path, color_model, sample_copy):
    image = sample_copy / "MONOCYTE" / "_0_1123.jpeg"
    before = image.read_bytes()
    for inputs in (sample_copy, image):
        r = classify(inputs, image, color_model, "--overwrite")
        assert r.exit_code == 5, r.output
        assert "_0_1123.jpeg is one of the input files (" in r.output
    assert image.read_bytes() == before


# -- the Python API in a plain script ---------------------------------------------------------------------
SCRIPT = """\
from wbc_batch import classify
from wbc_batch.inference.engine import RunnerOptions

rows = list(classify({inputs!r}, model={model!r}, options=RunnerOptions(workers=2, batch_size=4)))
print("rows", len(rows), "ok", sum(r.status == "ok" for r in rows))
"""


@pytest.mark.slow
@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("model", ["tiny", "shipped"])
def test_the_api_in_a_plain_script_runs_or_says_why_not(tmp_path, color_model, guarded, model):
    """``shipped``: a model file larger than a pipe's buffer (64 KiB). Sending it to a spawned worker before the
    worker has re-run the script deadlocked the parent forever when the script had no ``__main__`` guard."""
    path = color_model if model == "tiny" else default_model_path()
    if not path.is_file():
        pytest.skip("shipped model export/wbc-default.onnx missing")
    text = SCRIPT.format(inputs=str(SAMPLE), model=str(path))
    if guarded:
        text = text.replace("rows = list", 'if __name__ == "__main__":\n    rows = list').replace("\nprint(", "\n    print(")
    script = tmp_path / "script.py"
    script.write_text(text)
    r = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    if guarded:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "rows 40 ok 40"
    else:
        assert r.returncode != 0 and "rows" not in r.stdout
        assert 'if __name__ == "__main__":' in r.stderr
        assert r.stderr.count("Traceback") <= 2, r.stderr


def test_resume_retry_errors_from_the_command_line(tmp_path, color_model, sample_copy):
    late = sample_copy / "NEUTROPHIL" / "zz_late.jpeg"
    late.write_bytes(b"")
    out = tmp_path / "p.csv"
    assert classify(sample_copy, out, color_model).exit_code == 0
    late.write_bytes((sample_copy / "NEUTROPHIL").joinpath(sorted(os.listdir(sample_copy / "NEUTROPHIL"))[0]).read_bytes())
    r = classify(sample_copy, out, color_model, "--retry-errors")
    assert r.exit_code == 2 and "--retry-errors only applies with --resume" in r.output
    r = classify(sample_copy, out, color_model, "--resume", "--retry-errors")
    assert r.exit_code == 0, r.output
    assert [row["status"] for row in read_rows(out)] == ["ok"] * 41


@pytest.mark.parametrize("bad", ["folder", "shape"])
def test_an_unusable_sidecar_is_exit_5_and_the_rows_stay(tmp_path, color_model, sample_copy, bad):
    out = tmp_path / "p.csv"
    assert classify(sample_copy, out, color_model).exit_code == 0
    before = out.read_bytes()
    side = sidecar_path(out)
    side.unlink()
    if bad == "folder":
        side.mkdir()  # cannot be replaced by the new run's description
        r = classify(sample_copy, out, color_model, "--overwrite")
    else:
        side.write_text('{"model": []}')
        r = classify(sample_copy, out, color_model, "--resume")
    assert r.exit_code == 5, r.output
    assert out.read_bytes() == before
    assert "Traceback" not in r.output and "run.json" in r.output
