"""What keeps a run's output its own: one exclusive lock per output, and never an input as the output.

Why: two runs on one CSV (a second ``--resume`` or ``--overwrite`` while the first runs) write
duplicate rows, rows of two input roots, or NUL holes into one file, and nothing notices. The
lock is an ``fcntl.flock`` on ``<csv>.lock``, held for the whole run (CSV and sidecar): the
kernel drops it when its process dies, however it dies, so a lock left by a killed run is
simply taken over; a live holder is named by the pid written in the file. Where ``fcntl`` is
missing (Windows) runs are not locked.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .discover import is_image_name, looks_like_image
from .predictions import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(csv_path: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(csv_path) + ".lock")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _open_locked(path: Path, csv_path: str | os.PathLike[str]) -> int:
    """An fd of ``path`` holding its exclusive lock (the file still at that path), or OutputError naming the holder."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise OutputError(f"{csv_path} is in use by another wbc-batch run ({who}); wait for it to end, or write to another -o") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one


@contextmanager
def output_lock(csv_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``<csv>.lock`` exclusively while the block runs; refuse (OutputError, exit 5) when a live run holds it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = lock_path(csv_path)
    if path.parent and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the folder of {csv_path}: {e.strerror or e}") from e
    fd = _open_locked(path, csv_path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            path.unlink()  # while still locked: a waiting opener sees the file gone and retries
        except OSError:
            pass
        os.close(fd)


def refuse_input_as_output(csv_path: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """OutputError when the output is one of the input images (a file given, or one under a folder given).

    Not even ``--overwrite`` may replace an image with the CSV. A new CSV inside an input folder is fine.
    """
    out = os.path.realpath(csv_path)
    try:
        st = os.stat(out)
    except OSError:
        return  # not there yet: nothing to destroy
    if not stat.S_ISREG(st.st_mode) or not (is_image_name(out) or looks_like_image(out)):
        return
    for p in inputs:
        inp = os.path.realpath(p)
        if out == inp or (os.path.isdir(inp) and out.startswith(inp.rstrip(os.sep) + os.sep)):
            raise OutputError(f"output {csv_path} is one of the input images; give a CSV path that is not an input")
