"""wbc_batch.inference.pool: workers that cannot start are reported with their own words and exit code;
a missing ``__main__`` guard is named only when a worker says that is what happened."""

from __future__ import annotations

import errno
import multiprocessing
import multiprocessing.spawn
import multiprocessing.util
import os
import re
import subprocess
import sys
import threading
import time
from multiprocessing import resource_tracker
from pathlib import Path

import pytest
from conftest import LABELS, SAMPLE
from test_cli import ENV

from wbc_batch.inference.discover import iter_images
from wbc_batch.inference.engine import RunnerOptions
from wbc_batch.inference.local_engine import LocalEngine
from wbc_batch.inference.model import load_model
from wbc_batch.inference.pool import WorkerError, WorkerPool, _TappedProcess
from wbc_batch.inference.truth import truth_function

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="worker stderr is read through a POSIX pipe")

#: A site policy that lets the main program run but ends every worker process before Python reaches any of our code.
SITE = """\
import os, sys
if "--multiprocessing-fork" in getattr(sys, "orig_argv", sys.argv):
    sys.stderr.write("site policy: no child processes on this host\\n")
    sys.stderr.flush()
    os._exit(3)
"""

UNGUARDED = """\
from wbc_batch import classify
from wbc_batch.inference.engine import RunnerOptions

rows = list(classify({inputs!r}, model={model!r}, options=RunnerOptions({options})))
print("rows", len(rows))
"""

GUARDED = """\
from wbc_batch import classify
from wbc_batch.inference.engine import RunnerOptions

if __name__ == "__main__":
    rows = list(classify({inputs!r}, model={model!r}, options=RunnerOptions(workers=2, batch_size=4)))
    print("rows", len(rows))
"""


def _error_line(stderr: str) -> str:
    """The one line that carries the run's error (the CLI's message, or the exception a script died of)."""
    lines = [ln for ln in stderr.splitlines() if "the worker processes" in ln]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_workers_a_sitecustomize_ends_are_reported_in_their_words(tmp_path, color_model, how):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV["PYTHONPATH"]])}
    script = Path(sys.executable).with_name("wbc-batch")
    if how == "console script" and not script.is_file():
        pytest.skip("no wbc-batch console script next to this interpreter")
    entry = [str(script)] if how == "console script" else [sys.executable, "-m", "wbc_batch"]
    out = tmp_path / "p.csv"
    cmd = [*entry, "classify", str(SAMPLE), "-o", str(out), "-m", str(color_model), "--workers", "2", "-q"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    line = _error_line(r.stderr)
    assert re.search(r"the worker processes exit as soon as they start \(exit code 3; they said: site policy: no child processes on this host\)", line), line
    assert "__name__" not in r.stderr and "put the call" not in r.stderr
    assert "no row was written" in line


def test_a_guarded_script_read_from_stdin_is_not_blamed(tmp_path, color_model):
    """Workers cannot re-run a script that came from stdin: what they said (the file they could not find) is the message."""
    script = GUARDED.format(inputs=str(SAMPLE), model=str(color_model))
    r = subprocess.run([sys.executable, "-"], input=script, env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "rows" not in r.stdout
    line = _error_line(r.stderr)
    assert "(exit code 1; they said: FileNotFoundError: [Errno 2] No such file or directory: " in line and "<stdin>" in line, line
    assert "__name__" not in line and "put the call" not in line


def test_an_interpreter_this_user_cannot_run_is_named(tmp_path, color_model, monkeypatch):
    resource_tracker.ensure_running()  # started with the real interpreter, before it is swapped below
    exe = tmp_path / "python3"
    exe.write_bytes(b"")
    exe.chmod(0o644)  # no execute bit: exec fails (for root too)
    monkeypatch.setattr(multiprocessing.spawn, "_python_exe", os.fsencode(exe))  # what set_executable stores on POSIX
    model = load_model(color_model, threads=1)
    files = iter_images([str(SAMPLE)])
    with pytest.raises(WorkerError) as e:
        list(LocalEngine().batches(files, model, RunnerOptions(workers=2), truth_function(LABELS)))
    assert str(e.value) == (
        f"the worker processes exit as soon as they start (exit code 255; the interpreter {exe} cannot be run by this user; "
        "they said nothing); no row was written"
    )
    assert not multiprocessing.active_children()


def test_an_unguarded_script_is_told_about_the_guard_and_the_way_around_it(tmp_path, color_model):
    script = tmp_path / "script.py"
    script.write_text(UNGUARDED.format(inputs=str(SAMPLE), model=str(color_model), options="workers=1"))
    r = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "rows" not in r.stdout
    assert _error_line(r.stderr) == (
        f"wbc_batch.inference.pool.WorkerError: the worker processes exit as soon as they start: {script} starts a run when it "
        'is imported, and worker processes re-run it; put the call under `if __name__ == "__main__":`, or use '
        "RunnerOptions(in_process=True). No row was written."
    )
    script.write_text(UNGUARDED.format(inputs=str(SAMPLE), model=str(color_model), options="in_process=True"))
    r = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "rows 40", r.stderr


def test_a_process_that_cannot_spawn_workers_says_why_and_keeps_its_stderr(color_model, monkeypatch):
    resource_tracker.ensure_running()  # it is spawned the same way: not by the failing spawn below

    def cannot_fork(*args):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", cannot_fork)
    before = os.fstat(2)
    model = load_model(color_model, threads=1)
    with pytest.raises(WorkerError, match=r"^cannot start worker processes: \[Errno 11\] Resource temporarily unavailable; no row was written$"):
        list(LocalEngine().batches(iter_images([str(SAMPLE)]), model, RunnerOptions(workers=1), truth_function(LABELS)))
    after = os.fstat(2)  # fd 2 pointed at the workers' pipe only for the launch
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_ending_the_pool_ends_every_worker_it_started(color_model):
    """A restart and a kill end the workers now, found by the pool's own record of what it started."""
    pool = WorkerPool(2, load_model(color_model, threads=1), "cpu", 1)
    try:
        pool.start()
        first = list(pool.ctx.started)
        assert first and all(p.is_alive() for p in first)
        pool.restart()
        assert not any(p.is_alive() for p in first) and pool.restarts == 1
        pool.start()
        second = list(pool.ctx.started)
        assert second and not set(second) & set(first)
    finally:
        pool.close(kill=True)
    assert not any(p.is_alive() for p in second) and not multiprocessing.active_children()


def test_ending_the_pool_waits_for_the_executors_own_reaper(color_model, monkeypatch):
    """The executor's manager thread reaps the same workers; until it is done, a worker it reaped first can read as alive
    to us (its ``waitpid`` won, ours failed). Slowed down here, it must still be done when ``close`` returns."""
    join = _TappedProcess.join

    def slow_off_main(self, timeout=None):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        return join(self, timeout)

    monkeypatch.setattr(_TappedProcess, "join", slow_off_main)
    pool = WorkerPool(2, load_model(color_model, threads=1), "cpu", 1)
    pool.start()
    manager = pool.executor._executor_manager_thread
    assert manager is not None and manager.is_alive()
    pool.close(kill=True)
    assert not manager.is_alive() and not any(p.is_alive() for p in pool.ctx.started)
