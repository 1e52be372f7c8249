"""Lazy, sorted, loop-safe discovery of image files under the inputs.

Millions of files must not be listed into memory: directories are walked depth-first with
``os.scandir`` and only one directory's entries (sorted, for a stable order) are held at a
time per level. Symlinked directories are followed, but each real directory is walked once:
a link back to an ancestor (a loop), or a second link to a folder already walked, adds nothing
(so links that branch cannot multiply one file into thousands of rows).

No file is lost silently: a folder that cannot be listed (no permission, a path longer than the
OS allows) is yielded itself, so it becomes an error row that names it and says why; so is a
FIFO, device or socket with an image name (or a link to one), which is never opened for reading.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

#: Leading bytes of the formats we read, and their names: for files whose extension says
#: nothing, and to tell a corrupt image from a file that is no image at all.
IMAGE_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


@dataclass(frozen=True)
class InputFile:
    path: str  # as found on disk (absolute)
    rel: str  # relative to the run's root, POSIX separators: the CSV key


def looks_like_image(path: str) -> bool:
    """Content sniffing for files without an image extension; only a regular file is ever read.

    A FIFO would block the run for ever (no writer) and a device never ends (``/dev/zero``), so
    the file is checked before it is opened and again once open (it may have been swapped in
    between), and opened non-blocking: opening a FIFO that way returns at once.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        head = os.read(fd, 8) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return False
    finally:
        os.close(fd)
    return any(head.startswith(m) for m in IMAGE_MAGIC)


def _is_input(name: str, path: str, st: os.stat_result) -> bool:
    """Whether a walked entry that is no folder is an input (one row): an image name, or a regular file with image content.

    A FIFO, a device or a socket (or a link to one) with an image name is an input, so that it
    becomes an error row rather than vanish; without one it is not sniffed (see :func:`looks_like_image`).
    """
    if is_image_name(name):
        return True
    return stat.S_ISREG(st.st_mode) and looks_like_image(path)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def common_root(inputs: Sequence[str | os.PathLike[str]]) -> Path:
    """The folder that CSV paths are relative to: the input folder, or the common parent of all inputs."""
    if not inputs:
        raise ValueError("no inputs given")
    bases = []
    for p in inputs:
        ap = os.path.abspath(p)
        bases.append(ap if os.path.isdir(ap) else os.path.dirname(ap))
    return Path(os.path.commonpath(bases))


def _rel(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _walk(directory: str, root: str, visited: set[tuple[int, int]]) -> Iterator[InputFile]:
    try:
        with os.scandir(directory) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        # Unreadable (permission, path too long, ...): the folder itself is the row, so the files
        # in it are not lost without a word (its error says why).
        yield InputFile(directory, _rel(directory, root))
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError:
            # A dangling symlink, a vanished file, or a path too long to stat: report it if it
            # claims to be an image, or is a folder (whose files we cannot reach).
            if is_image_name(entry.name) or _is_dir_entry(entry):
                yield InputFile(entry.path, _rel(entry.path, root))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in visited:
                continue  # a loop, or a folder already walked by another path
            visited.add(key)
            yield from _walk(entry.path, root, visited)
        elif _is_input(entry.name, entry.path, st):
            yield InputFile(entry.path, _rel(entry.path, root))


def _is_dir_entry(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _found_by_walk(path: str, dirs: Sequence[str]) -> bool:
    """Whether walking one of the folder inputs ``dirs`` already yields ``path`` (an input inside another)."""
    for d in dirs:
        if path == d or not path.startswith(d.rstrip(os.sep) + os.sep):
            continue
        if any(part.startswith(".") for part in os.path.relpath(path, d).split(os.sep)):
            continue  # hidden on the way down: the walk skips it
        try:
            st = os.stat(path)
        except OSError:  # the walk lists a dangling symlink with an image name, not a missing file
            return os.path.islink(path) and is_image_name(path)
        return stat.S_ISDIR(st.st_mode) or _is_input(os.path.basename(path), path, st)
    return False


def iter_images(inputs: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str] | None = None) -> Iterator[InputFile]:
    """Yield image files under ``inputs`` (folders walked recursively, files taken as given).

    Order: inputs in the order given; inside a folder, depth-first with each folder's
    entries sorted by name. Hidden files and folders (leading dot) are skipped inside folders.
    An input inside another folder input is not yielded twice (one row per file), nor is a
    folder reached again through a symlink. A folder that cannot be listed is yielded itself.
    """
    inputs = list(inputs)
    root_s = os.fspath(root) if root is not None else os.fspath(common_root(inputs))
    abs_inputs = [os.path.abspath(p) for p in inputs]
    dirs = [ap for ap in dict.fromkeys(abs_inputs) if os.path.isdir(ap)]
    seen_inputs: set[str] = set()
    visited: set[tuple[int, int]] = set()  # (device, inode) of every folder walked, across the inputs
    for ap in abs_inputs:
        if ap in seen_inputs or _found_by_walk(ap, dirs):
            continue
        seen_inputs.add(ap)
        if os.path.isdir(ap):
            st = os.stat(ap)
            if (st.st_dev, st.st_ino) not in visited:
                visited.add((st.st_dev, st.st_ino))
                yield from _walk(ap, root_s, visited)
        else:
            # An explicitly named file is always an input (a missing one becomes an error row).
            yield InputFile(ap, _rel(ap, root_s))
