"""wbc_batch.inference.discover: sorted, lazy, loop-safe discovery; hidden and non-image files skipped."""

from __future__ import annotations

import inspect
import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import sample_images

from wbc_batch.inference.discover import InputFile, common_root, is_image_name, iter_images, looks_like_image
from wbc_batch.inference.preprocess import ImageError, PreprocessSpec, load_image

JPEG_BYTES = sample_images()[0].read_bytes()


def _rels(inputs, root=None) -> list[str]:
    return [f.rel for f in iter_images([os.fspath(p) for p in inputs], root)]


def _touch(p: Path, data: bytes = JPEG_BYTES) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_nested_folders_sorted_depth_first_with_posix_rel_paths(tmp_path):
    for name in ["b.jpg", "a/z.png", "a/b/c.jpeg", "a/a.jpg", "B.JPG", "c/d/e/f.tif", "a.bmp"]:
        _touch(tmp_path / name)
    got = list(iter_images([str(tmp_path)]))
    assert [f.rel for f in got] == ["B.JPG", "a/a.jpg", "a/b/c.jpeg", "a/z.png", "a.bmp", "b.jpg", "c/d/e/f.tif"]
    assert all(f.path == str(tmp_path / f.rel) for f in got)
    assert _rels([tmp_path]) == [f.rel for f in got]  # stable across walks


def test_is_lazy_generator(tmp_path):
    _touch(tmp_path / "a.jpg")
    assert inspect.isgenerator(iter_images([str(tmp_path)]))


def test_hidden_files_and_folders_are_skipped(tmp_path):
    _touch(tmp_path / "keep.jpg")
    _touch(tmp_path / ".hidden.jpg")
    _touch(tmp_path / ".cache" / "x.jpg")
    _touch(tmp_path / "sub" / ".DS_Store" / "y.jpg")
    _touch(tmp_path / "sub" / "ok.png")
    assert _rels([tmp_path]) == ["keep.jpg", "sub/ok.png"]


def test_non_images_skipped_but_extensionless_images_found(tmp_path):
    _touch(tmp_path / "README.txt", b"hello\n")
    _touch(tmp_path / "notes", b"plain text without extension\n")
    _touch(tmp_path / "scan0001", JPEG_BYTES)  # a scanner's extensionless JPEG
    _touch(tmp_path / "export.dat", b"\x89PNG\r\n\x1a\n" + bytes(32))
    _touch(tmp_path / "model.onnx", b"\x08\x07")
    _touch(tmp_path / "x.jpg", b"not really")  # an image name: taken, and becomes an error row later
    assert _rels([tmp_path]) == ["export.dat", "scan0001", "x.jpg"]


def test_symlink_loop_terminates_and_yields_each_file_once(tmp_path):
    _touch(tmp_path / "a" / "1.jpg")
    _touch(tmp_path / "a" / "b" / "2.jpg")
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")  # b/up -> its parent
    (tmp_path / "a" / "self").symlink_to(".")
    (tmp_path / "a" / "root").symlink_to(tmp_path)
    assert _rels([tmp_path]) == ["a/1.jpg", "a/b/2.jpg"]


def test_symlinked_folder_is_followed(tmp_path):
    other = tmp_path / "elsewhere"
    _touch(other / "x.jpg")
    root = tmp_path / "root"
    _touch(root / "y.jpg")
    (root / "linked").symlink_to(other)
    assert _rels([root]) == ["linked/x.jpg", "y.jpg"]


def test_dangling_symlink_with_image_name_is_kept_for_an_error_row(tmp_path):
    _touch(tmp_path / "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")
    assert _rels([tmp_path]) == ["gone.jpg", "ok.jpg"]


def test_directory_named_like_an_image_is_walked(tmp_path):
    _touch(tmp_path / "x.jpg" / "inner.png")
    assert _rels([tmp_path]) == ["x.jpg/inner.png"]


def test_explicit_files_are_always_inputs(tmp_path):
    """A file named on the command line is an input even if it does not look like one (or is missing)."""
    txt = _touch(tmp_path / "README.txt", b"hi")
    hidden = _touch(tmp_path / ".hidden.jpg")
    missing = tmp_path / "missing.jpg"
    assert _rels([txt, hidden, missing]) == ["README.txt", ".hidden.jpg", "missing.jpg"]


def test_inputs_in_given_order_relative_to_common_root(tmp_path):
    _touch(tmp_path / "d1" / "a.jpg")
    _touch(tmp_path / "d2" / "b.jpg")
    single = _touch(tmp_path / "d3" / "c.jpg")
    assert _rels([tmp_path / "d2", single, tmp_path / "d1"]) == ["d2/b.jpg", "d3/c.jpg", "d1/a.jpg"]
    assert _rels([tmp_path / "d1"]) == ["a.jpg"]
    assert _rels([tmp_path / "d1"], root=tmp_path) == ["d1/a.jpg"]


def test_duplicate_and_nested_inputs_yield_each_file_once(tmp_path):
    _touch(tmp_path / "d" / "a.jpg")
    _touch(tmp_path / "d" / "sub" / "b.jpg")
    _touch(tmp_path / "d" / ".hid" / "c.jpg")
    d = tmp_path / "d"
    assert _rels([d, d, str(d) + "/"]) == ["a.jpg", "sub/b.jpg"]
    assert _rels([d, d / "sub", d / "sub" / "b.jpg"]) == ["a.jpg", "sub/b.jpg"]
    assert _rels([d / "sub", d]) == ["a.jpg", "sub/b.jpg"]
    # A missing file is not found by the walk: it stays an input (an error row later).
    assert _rels([d, d / "sub" / "gone.jpg"]) == ["a.jpg", "sub/b.jpg", "sub/gone.jpg"]
    # A hidden folder is skipped by the walk, so naming it explicitly is the only way in: kept.
    assert _rels([d, d / ".hid"]) == ["a.jpg", "sub/b.jpg", ".hid/c.jpg"]
    # A non-image file named explicitly is not found by the walk: kept too.
    _touch(d / "notes.txt", b"x")
    assert _rels([d, d / "notes.txt"]) == ["a.jpg", "sub/b.jpg", "notes.txt"]
    # A dangling symlink with an image name is listed by the walk: not twice.
    (d / "sub" / "dangling.jpg").symlink_to(d / "nowhere.jpg")
    assert _rels([d, d / "sub" / "dangling.jpg"]) == ["a.jpg", "sub/b.jpg", "sub/dangling.jpg"]


def test_common_root():
    assert common_root(["/nonexistent/run1/x.jpg"]) == Path("/nonexistent/run1")  # missing: taken as a file
    with pytest.raises(ValueError, match="no inputs given"):
        common_root([])


def test_common_root_on_disk(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    f = _touch(tmp_path / "a" / "f.jpg")
    assert common_root([tmp_path / "a"]) == tmp_path / "a"
    assert common_root([f]) == tmp_path / "a"
    assert common_root([tmp_path / "a" / "x", tmp_path / "b"]) == tmp_path
    assert common_root([tmp_path / "a" / "x", f]) == tmp_path / "a"


def test_non_ascii_and_undecodable_names(tmp_path):
    _touch(tmp_path / "细胞" / "ä b,c.jpg")
    raw = os.fsencode(tmp_path) + b"/caf\xe4.jpg"  # Latin-1 bytes: not valid UTF-8
    try:
        with open(raw, "wb") as f:
            f.write(JPEG_BYTES)
    except OSError:
        pytest.skip("filesystem refuses non-UTF-8 names")
    rels = _rels([tmp_path])
    assert rels == ["caf\udce4.jpg", "细胞/ä b,c.jpg"]
    assert os.path.exists(tmp_path / rels[0])


def test_helpers():
    assert is_image_name("X.JPEG") and is_image_name("a.tiff") and not is_image_name("a.txt") and not is_image_name("jpg")
    assert looks_like_image(str(sample_images()[0]))
    assert not looks_like_image("/nonexistent/file")
    assert InputFile("/a/b.jpg", "b.jpg").rel == "b.jpg"


def test_branching_symlinked_folders_are_walked_once(tmp_path):
    """Two links per level to the level below: 2**12 paths to one image, one row."""
    _touch(tmp_path / "l00" / "x.jpg")
    for i in range(1, 13):
        d = tmp_path / f"l{i:02d}"
        d.mkdir()
        (d / "a").symlink_to(tmp_path / f"l{i - 1:02d}")
        (d / "b").symlink_to(tmp_path / f"l{i - 1:02d}")
    assert _rels([tmp_path / "l12"]) == ["a/" * 12 + "x.jpg"]
    assert _rels([tmp_path / "l12", tmp_path / "l00"]) == ["l12/" + "a/" * 12 + "x.jpg"]  # an input folder reached before


def _deep(base: Path, depth: int) -> Path:
    """A chain of 200-character folder names deeper than PATH_MAX allows, built a level at a time (fd-relative)."""
    name = "d" * 200
    fd = os.open(base, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        img = os.open("x.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(img, b"\xff\xd8\xff")
        os.close(img)
    finally:
        os.close(fd)
    return base.joinpath(*[name] * depth)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PATH_MAX of 4096 is Linux's")
def test_a_folder_too_deep_to_list_is_itself_a_row(tmp_path):
    _touch(tmp_path / "ok.jpg")
    _deep(tmp_path, 24)  # 24 x 201 characters: past 4096 somewhere on the way down
    rels = _rels([tmp_path])
    assert rels[-1] == "ok.jpg" and len(rels) == 2
    too_long = rels[0]
    assert too_long.startswith("d" * 200 + "/") and len(str(tmp_path / too_long)) >= 4096
    with pytest.raises(ImageError, match="^unreadable: File name too long"):
        load_image(str(tmp_path / too_long), PreprocessSpec(8, 8))


def test_an_unreadable_folder_is_itself_a_row(tmp_path, monkeypatch):
    _touch(tmp_path / "a" / "1.jpg")
    _touch(tmp_path / "locked" / "2.jpg")
    real = os.scandir

    def scandir(path="."):  # root reads any folder, so the refusal is simulated for this one
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert _rels([tmp_path]) == ["a/1.jpg", "locked"]
    with pytest.raises(ImageError, match=r"^unreadable folder: Permission denied; the files in it are not classified$"):
        load_image(str(tmp_path / "locked"), PreprocessSpec(8, 8))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev are POSIX")
def test_fifos_and_links_to_devices_with_image_names_are_rows(tmp_path):
    """One row per file: a FIFO, a link to /dev/zero or /dev/null named like an image becomes an error row.
    Without an image name they are not sniffed (reading a FIFO blocks, /dev/zero never ends): not inputs."""
    _touch(tmp_path / "ok.jpg")
    os.mkfifo(tmp_path / "pipe.jpeg")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "zero.jpeg").symlink_to("/dev/zero")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "null.png").symlink_to("/dev/null")
    (tmp_path / "zero").symlink_to("/dev/zero")
    assert _rels([tmp_path]) == ["ok.jpg", "pipe.jpeg", "sub/null.png", "zero.jpeg"]
    for rel in ("pipe.jpeg", "sub/null.png", "zero.jpeg"):
        with pytest.raises(ImageError, match="^unreadable: not a regular file$"):
            load_image(str(tmp_path / rel), PreprocessSpec(8, 8))
    # named on the command line as well: still one row each
    assert _rels([tmp_path, tmp_path / "pipe.jpeg", tmp_path / "sub" / "null.png"]) == ["ok.jpg", "pipe.jpeg", "sub/null.png", "zero.jpeg"]
    assert _rels([tmp_path, tmp_path / "pipe"]) == ["ok.jpg", "pipe.jpeg", "sub/null.png", "zero.jpeg", "pipe"]


@pytest.mark.skipif(not hasattr(os, "mknod") or os.geteuid() != 0, reason="creating a device node needs root")
def test_a_device_node_with_an_image_name_is_a_row(tmp_path):
    os.mknod(tmp_path / "null.jpeg", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers on Linux
    os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    assert _rels([tmp_path]) == ["null.jpeg"]
    with pytest.raises(ImageError, match="^unreadable: not a regular file$"):
        load_image(str(tmp_path / "null.jpeg"), PreprocessSpec(8, 8))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_sniffing_never_reads_a_fifo(tmp_path):
    """A file swapped for a FIFO after the walk saw it: sniffing must not read it (with no writer, a read blocks for ever)."""
    fifo = tmp_path / "scan0001"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)  # a writer that holds JPEG magic in the pipe: a read would return it
    try:
        os.write(fd, JPEG_BYTES[:8])
        assert not looks_like_image(str(fifo))
    finally:
        os.close(fd)
