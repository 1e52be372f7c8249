"""What keeps a run's output its own: one exclusive lock per output under all its names, and no file the run reads as the output.

Why: two runs on one CSV (a second ``--resume`` or ``--overwrite`` while the first runs) write
duplicate rows, rows of two input roots, or NUL holes into one file, and nothing notices. A run
holds an ``fcntl.flock`` on ``<csv>.lock``, named from the path the output *resolves* to (so a
symlink to the CSV, a symlinked folder or ``..`` on the way all name one lock file), and a flock
on the CSV itself, which is per inode: a hard link to it is the same lock. Both are held for the
whole run; the kernel drops them when the process dies, however it dies, so a lock left by a
killed run is simply taken over; a live holder is named by the pid written in the lock file.
Where ``fcntl`` is missing (Windows) runs are not locked.

A run truncates its output before it reads the first input, so an output that is one of the
files it reads (an input image, reached by whatever path the walk takes; the model; the labels
file) would be destroyed: it is refused, even with ``--overwrite``. Files are compared by
identity (device and inode), not by name, because every name of a file is the same bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .discover import is_image_name, iter_images, looks_like_image
from .predictions import OutputError, companion_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_IN_USE = "is in use by another wbc-batch run"


def lock_path(csv_path: str | os.PathLike[str]) -> Path:
    """``<csv>.lock``, beside the file ``csv_path`` resolves to (:func:`companion_path`)."""
    return companion_path(csv_path, ".lock")


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
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise OutputError(f"{csv_path} {_IN_USE} ({who}); wait for it to end, or write to another -o") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one


class OutputLock:
    """The flocks a run holds on the CSV file itself (its inodes), besides the lock file: see :meth:`cover`."""

    def __init__(self, csv_path: str | os.PathLike[str]) -> None:
        self.csv_path = csv_path
        self._fds: list[int] = []
        self._held: set[tuple[int, int]] = set()

    def cover(self) -> None:
        """Lock the file now at the output path by its inode: the existing CSV at the start, the one the run created once it is open.

        A second run that reaches this file through a hard link has another lock file, but not another
        inode: it is refused here, before it truncates anything. Nothing to do for an output that is
        not there (yet), cannot be read, or is no regular file.
        """
        if fcntl is None:  # pragma: no cover
            return
        try:
            fd = os.open(os.path.realpath(self.csv_path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode) or key in self._held:
            os.close(fd)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"{self.csv_path} {_IN_USE} (one that writes this file under another name); wait for it to end, or write to another -o"
            ) from None
        self._fds.append(fd)
        self._held.add(key)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._held.clear()


@contextmanager
def output_lock(csv_path: str | os.PathLike[str]) -> Iterator[OutputLock]:
    """Hold the output's lock file and the CSV's inode exclusively while the block runs; OutputError (exit 5) when a live run holds either.

    A lock file that cannot be written (a full disk) is an OutputError too, and is removed.
    """
    lock = OutputLock(csv_path)
    if fcntl is None:  # pragma: no cover
        yield lock
        return
    path = lock_path(csv_path)
    if not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the folder of {csv_path}: {e.strerror or e}") from e
    fd = _open_locked(path, csv_path)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            raise OutputError(f"cannot write the lock file {path}: {e.strerror or e}") from e
        lock.cover()
        yield lock
    finally:
        lock.release()
        try:
            path.unlink()  # while still locked: a waiting opener sees the file gone and retries
        except OSError:
            pass
        os.close(fd)


def _identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_input_as_output(
    csv_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    root: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
) -> None:
    """OutputError when the existing output is a file this run reads: the model, the labels file, an input named or walked.

    Not even ``--overwrite`` may replace one of them with the CSV. A new CSV inside an input folder is fine.
    The inputs are walked (with the run's own walk, so symlinked folders count) only when the output
    could be an image to that walk: an image name or image bytes, or a second name (a hard link)
    that may be an image name. A previous CSV is neither, so replacing it costs no walk of a large tree.
    """
    real = os.path.realpath(csv_path)
    try:
        st = os.stat(real)
    except OSError:
        return  # not there yet: nothing to destroy
    if not stat.S_ISREG(st.st_mode):
        return  # a device or a FIFO holds no bytes to lose
    key = (st.st_dev, st.st_ino)
    for what, p in (("the model file", model), ("the --labels file", labels)):
        if p is not None and _identity(p) == key:
            raise OutputError(f"output {csv_path} is {what}; give a CSV path that is not an input")
    named = next((p for p in inputs if _identity(p) == key), None)
    if named is not None:
        _refuse_input(csv_path, Path(os.path.relpath(os.path.abspath(named), root)).as_posix())
    if st.st_nlink > 1 or is_image_name(real) or looks_like_image(real):
        for f in iter_images(inputs, root):
            if _identity(f.path) == key:
                _refuse_input(csv_path, f.rel)


def _refuse_input(csv_path: str | os.PathLike[str], rel: str) -> None:
    raise OutputError(f"output {csv_path} is one of the input files ({rel}); give a CSV path that is not an input")
