"""wbc_batch.inference.preprocess: the one decode path; every bad-input kind gets its own reason, odd modes are converted."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_images
from PIL import Image, ImageFile

from wbc_batch.inference.preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessSpec, load_image, load_image_bytes

SPEC = PreprocessSpec(height=24, width=32)
JPEG = sample_images()[0]  # a real 320x240 RGB JPEG


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_header_only(path: Path, width: int, height: int, color_type: int = 2) -> Path:
    """A PNG whose IHDR claims ``width x height`` but whose data is a few bytes: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))
    return path


def _pil_reference(path: Path, spec: PreprocessSpec) -> np.ndarray:
    with Image.open(path) as im:
        if spec.jpeg_draft:
            im.draft("RGB", (spec.width, spec.height))
        rgb = im.convert("RGB").resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        return np.asarray(rgb)


# -- good files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft", [True, False])
def test_real_jpeg_is_decoded_and_resized_like_pil(draft):
    spec = PreprocessSpec(24, 32, jpeg_draft=draft)
    arr = load_image(JPEG, spec)
    assert arr.shape == (24, 32, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, _pil_reference(JPEG, spec))


def test_draft_changes_the_decode_so_it_is_part_of_the_contract():
    a = load_image(JPEG, PreprocessSpec(24, 32, jpeg_draft=True))
    b = load_image(JPEG, PreprocessSpec(24, 32, jpeg_draft=False))
    assert not np.array_equal(a, b)


def test_file_object_bytes_and_path_agree():
    by_path = load_image(JPEG, SPEC)
    np.testing.assert_array_equal(load_image_bytes(JPEG.read_bytes(), SPEC), by_path)
    with open(JPEG, "rb") as f:
        np.testing.assert_array_equal(load_image(f, SPEC), by_path)
    np.testing.assert_array_equal(load_image(str(JPEG), SPEC), by_path)


def test_image_already_at_size_is_not_resampled(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    np.testing.assert_array_equal(load_image(tmp_path / "x.png", SPEC), a)


@pytest.mark.parametrize("method", ["nearest", "bicubic", "lanczos", "box"])
def test_resize_method_from_spec(tmp_path, method):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    want = np.asarray(Image.open(tmp_path / "x.png").resize((32, 24), getattr(Image.Resampling, method.upper())))
    np.testing.assert_array_equal(load_image(tmp_path / "x.png", PreprocessSpec(24, 32, resize=method)), want)


def test_spec_validation_and_dict_round_trip():
    with pytest.raises(ValueError, match="image size must be positive, got 0x32"):
        PreprocessSpec(0, 32)
    with pytest.raises(ValueError, match="unknown resize method 'area'"):
        PreprocessSpec(24, 32, resize="area")
    spec = PreprocessSpec(24, 32, resize="bicubic", jpeg_draft=False, max_pixels=1000)
    assert spec.to_dict() == {"height": 24, "width": 32, "resize": "bicubic", "jpeg_draft": False, "max_pixels": 1000, "keep_aspect": False}
    assert PreprocessSpec.from_dict({**spec.to_dict(), "unrelated": 1}) == spec
    assert PreprocessSpec.from_dict({"height": 5, "width": 6}) == PreprocessSpec(5, 6, "bilinear", True, DEFAULT_MAX_PIXELS)


# -- mode conversions: converted, never failed --------------------------------------------------------
def _load_png(tmp_path: Path, im: Image.Image, **save) -> np.ndarray:
    p = tmp_path / "x.png"
    im.save(p, **save)
    return load_image(p, SPEC)


def test_grayscale_l_is_replicated_to_rgb(tmp_path):
    a = np.tile(np.arange(32, dtype=np.uint8) * 8, (24, 1))
    arr = _load_png(tmp_path, Image.fromarray(a, "L"))
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], a)


def test_one_bit_image(tmp_path):
    a = np.zeros((24, 32), bool)
    a[:, 16:] = True
    arr = _load_png(tmp_path, Image.fromarray(a))
    assert (arr[:, :16] == 0).all() and (arr[:, 16:] == 255).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.zeros((24, 32), np.uint16)
    a[:, 8:16], a[:, 16:24], a[:, 24:] = 257, 32896, 65535  # 1, 128, 255 in 8 bits
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode == "I;16"
    arr = load_image(p, SPEC)
    assert arr[0, :8].tolist() == [[0, 0, 0]] * 8
    assert arr[0, 8:16].tolist() == [[1, 1, 1]] * 8
    assert arr[0, 16:24].tolist() == [[128, 128, 128]] * 8
    assert arr[0, 24:].tolist() == [[255, 255, 255]] * 8


def test_dark_sixteen_bit_image_stays_dark(tmp_path):
    """A 16-bit file whose values all happen to be <= 255 is still 16-bit: 200/65535 is black, not 200."""
    p = tmp_path / "dark.png"
    Image.fromarray(np.full((24, 32), 200, np.uint16)).save(p)
    assert (load_image(p, SPEC) == 1).all()  # 200 / 257 = 0.78 -> 1


def test_rgba_transparent_becomes_white_opaque_keeps_colour(tmp_path):
    a = np.zeros((24, 32, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 0)  # fully transparent red
    a[:, 10:20] = (10, 20, 30, 255)  # opaque
    a[:, 20:] = (0, 0, 0, 128)  # half-transparent black over white
    arr = _load_png(tmp_path, Image.fromarray(a, "RGBA"))
    assert (arr[:, :10] == 255).all()
    assert (arr[:, 10:20] == (10, 20, 30)).all()
    assert (arr[:, 20:] == 127).all()


def test_la_transparent_becomes_white(tmp_path):
    a = np.zeros((24, 32, 2), np.uint8)
    a[:, :16] = (50, 0)
    a[:, 16:] = (50, 255)
    arr = _load_png(tmp_path, Image.fromarray(a, "LA"))
    assert (arr[:, :16] == 255).all() and (arr[:, 16:] == 50).all()


def _palette_image() -> Image.Image:
    idx = np.zeros((24, 32), np.uint8)
    idx[:, 16:] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette([200, 100, 50, 10, 20, 30] + [0, 0, 0] * 254)
    return im


def test_palette_without_transparency(tmp_path):
    arr = _load_png(tmp_path, _palette_image())
    assert (arr[:, :16] == (200, 100, 50)).all() and (arr[:, 16:] == (10, 20, 30)).all()


def test_palette_with_transparent_index_becomes_white(tmp_path):
    p = tmp_path / "pt.png"
    _palette_image().save(p, transparency=0)
    with Image.open(p) as im:
        assert im.mode == "P" and im.info["transparency"] == 0
    arr = load_image(p, SPEC)
    assert (arr[:, :16] == 255).all() and (arr[:, 16:] == (10, 20, 30)).all()


def test_cmyk_tiff_is_converted(tmp_path):
    a = np.zeros((24, 32, 4), np.uint8)
    a[:, 8:16] = (0, 0, 0, 255)  # black
    a[:, 16:24] = (255, 0, 0, 0)  # cyan
    a[:, 24:] = (100, 50, 25, 10)
    p = tmp_path / "c.tif"
    Image.fromarray(a, "CMYK").save(p)
    arr = load_image(p, SPEC)
    assert (arr[:, :8] == 255).all()
    assert (arr[:, 8:16] == 0).all()
    assert (arr[:, 16:24] == (0, 255, 255)).all()
    assert (arr[:, 24:] == (149, 197, 221)).all()


def test_cmyk_jpeg_is_converted(tmp_path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (320, 240), (0, 0, 0, 0)).save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    arr = load_image(p, SPEC)
    assert arr.shape == (24, 32, 3) and int(arr.min()) >= 252  # blank paper, give or take JPEG rounding


def test_grayscale_jpeg_with_draft(tmp_path):
    p = tmp_path / "g.jpg"
    Image.open(JPEG).convert("L").save(p, quality=95)
    arr = load_image(p, SPEC)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


# -- bad files: one ImageError each, with its own reason ----------------------------------------------
def test_truncated_jpeg(tmp_path):
    data = JPEG.read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"^truncated image: image file is truncated"):
        load_image(p, SPEC)
    with pytest.raises(ImageError, match=r"^truncated image: "):
        load_image(p, PreprocessSpec(24, 32, jpeg_draft=False))


def test_truncated_png(tmp_path):
    p = tmp_path / "half.png"
    Image.open(JPEG).save(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"^truncated image: "):
        load_image(p, SPEC)


def test_corrupt_jpeg_data(tmp_path):
    data = bytearray(JPEG.read_bytes())
    data[400:600] = bytes(200)  # wipe the Huffman tables: the header parses, the data does not
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"^corrupt image: broken data stream"):
        load_image(p, SPEC)


def test_corrupt_header_is_not_called_a_non_image(tmp_path):
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(JPEG.read_bytes()[:20] + bytes(range(256)) * 8)
    with pytest.raises(ImageError, match=r"^corrupt image: starts like a JPEG file but its header cannot be parsed$"):
        load_image(p, SPEC)
    png = tmp_path / "badcrc.png"
    Image.new("RGB", (8, 8)).save(png)
    b = bytearray(png.read_bytes())
    b[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    png.write_bytes(bytes(b))
    with pytest.raises(ImageError, match=r"^corrupt image: starts like a PNG file"):
        load_image(png, SPEC)


def test_empty_file(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^empty file$"):
        load_image(tmp_path / "e.jpg", SPEC)
    with pytest.raises(ImageError, match=r"^empty file$"):
        load_image_bytes(b"", SPEC)
    with pytest.raises(ImageError, match=r"^empty file$"):
        load_image(io.BytesIO(b""), SPEC)


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=r"^not an image \(format not recognised\)$"):
        load_image(tmp_path / "notes.jpg", SPEC)


def test_dangling_symlink_is_unreadable(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(ImageError, match=r"^unreadable: No such file or directory$"):
        load_image(tmp_path / "gone.jpg", SPEC)


def test_directory_named_like_an_image_is_unreadable(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(ImageError, match=r"^unreadable: a directory$"):
        load_image(tmp_path / "x.jpg", SPEC)


def test_fifo_is_refused_without_blocking(tmp_path):
    """Opening a FIFO blocks until a writer comes: it must be refused before open()."""
    p = tmp_path / "pipe.jpg"
    os.mkfifo(p)
    errors: list[str] = []
    t = threading.Thread(target=lambda: errors.append(_reason(p)), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the thread before failing
        with open(p, "wb"):
            pass
        pytest.fail("load_image blocked on a FIFO")
    assert errors == ["unreadable: not a regular file"]


def _reason(p: Path) -> str:
    try:
        load_image(p, SPEC)
    except ImageError as e:
        return str(e)
    return "decoded"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode; the dangling-symlink and directory tests cover 'unreadable' here")
def test_permission_denied_is_unreadable(tmp_path):
    p = tmp_path / "locked.jpg"
    p.write_bytes(JPEG.read_bytes())
    p.chmod(0)
    try:
        with pytest.raises(ImageError, match=r"^unreadable: Permission denied$"):
            load_image(p, SPEC)
    finally:
        p.chmod(0o644)


def test_decompression_bomb_header(tmp_path):
    """A PNG claiming 100000 x 100000 pixels is refused from its header, nothing allocated."""
    p = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError, match=r"^image too large"):
        load_image(p, SPEC)


def test_header_over_our_limit_gives_our_message(tmp_path):
    p = _png_header_only(tmp_path / "big.png", 9500, 9500)
    with pytest.raises(ImageError, match=rf"^image too large: 9500x9500 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} \(possible decompression bomb\)$"):
        load_image(p, SPEC)


def test_real_image_over_a_small_max_pixels(tmp_path):
    with pytest.raises(ImageError, match=r"^image too large: 320x240 pixels exceeds the limit of 76799 "):
        load_image(JPEG, PreprocessSpec(24, 32, max_pixels=320 * 240 - 1))
    assert load_image(JPEG, PreprocessSpec(24, 32, max_pixels=320 * 240)).shape == (24, 32, 3)


def test_max_pixels_above_pils_threshold_is_honoured(tmp_path):
    """A model may allow more pixels than PIL's warning threshold: PIL's warning must not refuse the file."""
    p = _png_header_only(tmp_path / "big.png", 9500, 9500, color_type=0)  # 90.25 MP > PIL's 89.5 MP
    with pytest.raises(ImageError) as e:
        load_image(p, PreprocessSpec(24, 32, max_pixels=100_000_000))
    assert str(e.value).startswith("truncated image")  # it got as far as decoding the (short) data


def test_fit_box_rule():
    from wbc_batch.inference.preprocess import fit_box

    assert fit_box(360, 363, 320, 240) == (41, 0, 238, 240)  # a cell analyser's crop in a 4:3 frame
    assert fit_box(120, 120, 320, 240) == (40, 0, 240, 240)  # upscaled to fill the height
    assert fit_box(640, 480, 320, 240) == (0, 0, 320, 240)  # same aspect: the same as stretching
    assert fit_box(1000, 10, 320, 240) == (0, 118, 320, 3)


def test_keep_aspect_pads_with_black_instead_of_stretching(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(1, 256, (363, 360, 3), dtype=np.uint8))
    img.save(tmp_path / "cell.png")
    out = load_image(tmp_path / "cell.png", PreprocessSpec(240, 320, keep_aspect=True))
    assert out.shape == (240, 320, 3)
    assert out[:, :41].max() == 0 and out[:, 41 + 238 :].max() == 0
    np.testing.assert_array_equal(out[:, 41 : 41 + 238], np.asarray(img.resize((238, 240), Image.Resampling.BILINEAR)))
    stretched = load_image(tmp_path / "cell.png", PreprocessSpec(240, 320))
    assert stretched[:, :41].min() > 0  # the stretch fills the frame: no black bars


def test_a_float_tiff_is_scaled_by_its_range_not_decoded_black(tmp_path):
    gray = np.asarray(Image.open(sample_images()[0]).convert("L"), dtype=np.float32)
    spec = PreprocessSpec(24, 32)
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "gray8.png")
    want = load_image(tmp_path / "gray8.png", spec)
    for name, data in [("unit.tif", gray / 255.0), ("bytes.tif", gray), ("wide.tif", gray * 10.0 - 500.0)]:
        Image.fromarray(data.astype(np.float32), mode="F").save(tmp_path / name)
        got = load_image(tmp_path / name, spec)
        assert got.mean() > 50, name  # was all black for the 0..1 file
        if name != "wide.tif":
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name
    nan = (gray / 255.0).copy()
    nan[: len(nan) // 2] = np.nan  # the top half: black
    Image.fromarray(nan.astype(np.float32), mode="F").save(tmp_path / "nan.tif")
    assert load_image(tmp_path / "nan.tif", spec)[:1].max() == 0


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    upright = Image.fromarray(pixels)
    spec = PreprocessSpec(30, 40, jpeg_draft=False)
    upright.save(tmp_path / "upright.png")
    # A camera that stores the shot turned 90 degrees and tags it "rotate 90 CW to display" (orientation 6).
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.png", exif=exif.tobytes())
    stored.save(tmp_path / "untagged.png")
    np.testing.assert_array_equal(load_image(tmp_path / "tagged.png", spec), load_image(tmp_path / "upright.png", spec))
    assert load_image(tmp_path / "untagged.png", PreprocessSpec(40, 30, jpeg_draft=False)).shape == (40, 30, 3)


# -- what one decode may cost ----------------------------------------------------------------------
def _black_png(path: Path, width: int, height: int, bit_depth: int = 16) -> Path:
    """A real greyscale PNG of black pixels: its data compresses to ~170 KB at 9400 x 9400 x 16 bit.

    Built from one compressed block of rows repeated (each ends in a full flush, so the blocks are
    independent), so making it costs milliseconds, not a compression of the whole image.
    """
    rows = 100
    assert height % rows == 0
    block = b"\0" * ((1 + width * bit_depth // 8) * rows)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows):
        adler = zlib.adler32(block, adler)
    data = b"\x78\xda" + packed * (height // rows) + z.flush() + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    return path


def _never(*args, **kwargs):
    raise AssertionError("the image was decoded (or opened) although its header already refused it")


def test_black_png_helper_makes_a_real_image(tmp_path):
    with Image.open(_black_png(tmp_path / "b.png", 300, 200)) as im:
        assert (im.mode, im.size) == ("I;16", (300, 200)) and np.asarray(im).max() == 0


def test_sixteen_bit_png_over_the_memory_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    """9400 x 9400 is under the pixel limit, but as 16-bit greyscale its decode and conversion to 8-bit held 2.3 GB."""
    p = _black_png(tmp_path / "big16.png", 9400, 9400)
    assert p.stat().st_size < 200_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", _never)
    with pytest.raises(ImageError, match=r"^image too large: 9400x9400 pixels of mode I;16 need 2359 MiB to decode, over the limit of 1024 MiB$"):
        load_image(p, SPEC)


def test_the_memory_budget_counts_bytes_per_pixel_of_the_mode(tmp_path, monkeypatch):
    """The same pixel count is refused as RGBA (composited on white through three full-size copies) and decoded as RGB."""
    monkeypatch.setattr(ImageFile.ImageFile, "load", _never)
    rgba = _png_header_only(tmp_path / "rgba.png", 8000, 8000, color_type=6)
    with pytest.raises(ImageError, match=r"^image too large: 8000x8000 pixels of mode RGBA need 1465 MiB to decode, over the limit of 1024 MiB$"):
        load_image(rgba, SPEC)
    rgb = _png_header_only(tmp_path / "rgb.png", 8000, 8000, color_type=2)
    with pytest.raises(AssertionError, match="the image was decoded"):
        load_image(rgb, SPEC)  # within the budget: it goes on to decode


def test_a_huge_file_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    """3 GB of JPEG magic and zeros (a sparse file) took 4.5 minutes to be found no image; its size refuses it unread."""
    p = tmp_path / "huge.jpeg"
    p.write_bytes(b"\xff\xd8\xff")
    os.truncate(p, 3 * 2**30)
    monkeypatch.setattr(Image, "open", _never)
    with pytest.raises(ImageError, match=r"^file too large: 3221225472 bytes, over the limit of 536870912 bytes \(512 MiB\) for one image$"):
        load_image(p, SPEC)
    with pytest.raises(ImageError, match=r"^file too large: 3221225472 bytes, over"):
        with open(p, "rb") as f:
            load_image(f, SPEC)


def _bytes_read() -> int:
    """Bytes this process has had from read(2) so far (Linux's counter): how far a parser went into a file."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process read counter")
def test_junk_after_the_jpeg_magic_is_given_up_after_a_bounded_read(tmp_path):
    """Under the byte budget, 256 MiB of zeros after the magic were read one byte at a time by the JPEG header parser."""
    p = tmp_path / "junk.jpeg"
    p.write_bytes(b"\xff\xd8\xff")
    os.truncate(p, 256 * 2**20)
    before = _bytes_read()
    with pytest.raises(ImageError, match=r"^corrupt image: no image header in its first 4 MiB$"):
        load_image(p, SPEC)
    assert _bytes_read() - before < 8 * 2**20  # not the 256 MiB
    with open(p, "rb") as f:
        with pytest.raises(ImageError, match=r"^corrupt image: no image header in its first 4 MiB$"):
            load_image(f, SPEC)
    assert _bytes_read() - before < 16 * 2**20


def test_ordinary_images_decode_exactly_as_before(tmp_path):
    """The budgets change nothing for the images a lab has: camera JPEGs, 16-bit greyscale of ordinary size, sample_data."""
    spec = PreprocessSpec(240, 320)
    field = Image.open(JPEG).convert("RGB")
    for w, h in ((2048, 1536), (4000, 3000)):
        field.resize((w, h)).save(tmp_path / f"{w}.jpeg", quality=90)
        for draft in (True, False):
            s = PreprocessSpec(240, 320, jpeg_draft=draft)
            np.testing.assert_array_equal(load_image(tmp_path / f"{w}.jpeg", s), _pil_reference(tmp_path / f"{w}.jpeg", s))
    rng = np.random.default_rng(0)
    grey = np.asarray(field.convert("L").resize((2048, 1536)), dtype=np.uint16) * 257 + rng.integers(0, 257, (1536, 2048), dtype=np.uint16)
    want = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    want = np.asarray(want.resize((320, 240), Image.Resampling.BILINEAR))
    for name in ("grey16.png", "grey16.tif"):
        Image.frombytes("I;16", (2048, 1536), grey.tobytes()).save(tmp_path / name)
        np.testing.assert_array_equal(load_image(tmp_path / name, spec), want)
    for p in sample_images():
        np.testing.assert_array_equal(load_image(p, spec), _pil_reference(p, spec))
