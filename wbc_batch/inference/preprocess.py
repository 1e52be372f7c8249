"""The one decode-and-resize path shared by training, export checks and classify.

Every consumer of a model (train, export parity, classify, the Ray engine) calls
:func:`load_image` with the :class:`PreprocessSpec` read from the model's metadata, so
the array a network sees for a given file is the same everywhere. The network itself
normalises (uint8 RGB NHWC in), so embedders in other languages only decode and resize.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .discover import IMAGE_MAGIC

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]

#: PIL filters by the names stored in model metadata.
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

#: Pixel count above which a file is refused as a decompression bomb (PIL's own default).
DEFAULT_MAX_PIXELS = 89_478_485

# What one file may cost, checked before the work it would cost (README: "What one image may cost").
#: Bytes one image file may have, from its size before it is opened. A 20 MP camera field is ~10 MB as
#: JPEG and 120 MB as uncompressed 16-bit RGB TIFF; over this, a file is refused unread (3 GB of JPEG
#: magic and zeros took 4.5 minutes to be found no image; Pillow's WebP reader reads a file whole).
MAX_FILE_BYTES = 512 * 2**20
#: Memory one decode may hold: pixels (after the JPEG draft) x the bytes a pixel of the decoded mode costs
#: on the way to 8-bit RGB (:data:`DECODE_BYTES_PER_PIXEL`), from the header, before anything is decoded.
#: No 8-bit RGB, CMYK, L or P image under the pixel limit reaches it; 16-bit greyscale over ~38 MP and RGBA
#: over ~45 MP do (a 9400 x 9400 16-bit PNG is 172 KB on disk and held 2.3 GB to decode).
MAX_DECODE_BYTES = 2**30
#: Peak bytes per pixel of :func:`load_image` by decoded mode: Pillow's storage (4 bytes for RGB, CMYK,
#: RGBA, I and F; 2 for 16-bit; 1 for L, P and 1), a second copy when EXIF turns the image, and what the
#: conversion to 8-bit RGB holds at once (16-bit and float go through float64 arrays, alpha is composited on
#: a full-size white image). Measured (peak RSS) on 3000 x 3000 files, rotated, rounded up; a mode not
#: listed counts as the largest.
DECODE_BYTES_PER_PIXEL = {
    **dict.fromkeys(("1", "L"), 6),
    **dict.fromkeys(("P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"), 9),
    "P transparent": 21,  # expanded to RGBA before compositing
    **dict.fromkeys(("RGBA", "RGBa", "LA", "La", "PA"), 24),
    **dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), 28),
    "I": 29,
    "F": 30,
}
#: Bytes Pillow may read from a file to find its size and mode (its header): a camera JPEG's, with EXIF
#: and a colour profile, is tens of KB. Pillow's JPEG parser skips junk after the magic one byte at a time
#: (4.5 minutes for 3 GB of zeros); this stops it after a fraction of a second.
HEADER_BYTES = 4 * 2**20


class ImageError(Exception):
    """A file that cannot be turned into a model input; the message is shown to the user.

    Deliberately not a :class:`wbc_batch.errors.WbcBatchError`: a bad image is one error *row*
    with this reason, and the run goes on; it never ends a run or sets an exit code.
    """


@dataclass(frozen=True)
class PreprocessSpec:
    """How a file becomes an ``height x width x 3`` uint8 RGB array."""

    height: int
    width: int
    resize: str = "bilinear"
    jpeg_draft: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Fit inside height x width keeping the aspect ratio, centred on black, instead of stretching:
    #: a cell keeps its shape whatever the camera's frame (see :func:`fit_box` for the exact rule).
    keep_aspect: bool = False

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.resize not in _FILTERS:
            raise ValueError(f"unknown resize method {self.resize!r}; known: {sorted(_FILTERS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        known = {k: d[k] for k in ("height", "width", "resize", "jpeg_draft", "max_pixels", "keep_aspect") if k in d}
        return cls(**known)


def _float_to_8bit_range(a: np.ndarray) -> np.ndarray:
    """A float image onto 0..255 by the range its values use: 0..1 (the usual float convention) is
    scaled by 255, 0..255 is kept, anything else is stretched from its minimum to its maximum.
    Not-a-number pixels become 0. (Without this a 0..1 image decoded all black.)
    """
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        return a * 255.0
    if lo >= 0.0 and hi <= 255.0:
        return a
    return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)


def _upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: the EXIF orientation tag applied (cameras store turned shots sideways)."""
    if "exif" not in im.info and im.format != "TIFF":
        return im  # no EXIF block at all (most microscope images): nothing to parse
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF must not cost the image; it is shown as stored
        return im
    return ImageOps.exif_transpose(im) if orientation in (2, 3, 4, 5, 6, 7, 8) else im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited on white (a slide's background)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            a = _float_to_8bit_range(a)
        elif mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit range onto 8-bit
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(src: PathOrFile, spec: PreprocessSpec) -> np.ndarray:
    """Decode ``src`` and resize it to the spec: an ``(H, W, 3)`` uint8 array.

    Raises :class:`ImageError` with a short, specific reason for empty, truncated,
    corrupt, non-image, unreadable and oversized files (over the pixel limit, :data:`MAX_FILE_BYTES`
    or :data:`MAX_DECODE_BYTES`), each found before the work it would cost.
    """
    if not isinstance(src, (str, os.PathLike)):
        _check_file_bytes(_size_of(src))
        counted = _CountedReads(src)
        return _decode(counted, counted, spec)
    # Open it ourselves, so that "cannot open" (missing, permission, a directory, a FIFO
    # that would block for ever) is never mistaken for "cannot decode".
    try:
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(_not_a_file(src, st))
        if st.st_size == 0:
            raise ImageError("empty file")
        _check_file_bytes(st.st_size)
        raw = _CountedFile(src)
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or e}") from e
    with io.BufferedReader(raw) as f:
        return _decode(f, raw, spec)


def _not_a_file(path: str | os.PathLike[str], st: os.stat_result) -> str:
    """Why a path that is not a regular file has no image; a folder the walk could not list says so (its files have no rows)."""
    if not stat.S_ISDIR(st.st_mode):
        return "unreadable: not a regular file"
    try:
        with os.scandir(path):
            pass
    except OSError as e:
        return f"unreadable folder: {e.strerror or e}; the files in it are not classified"
    return "unreadable: a directory"


def _check_file_bytes(size: int | None) -> None:
    if size is not None and size > MAX_FILE_BYTES:
        raise ImageError(f"file too large: {size} bytes, over the limit of {MAX_FILE_BYTES} bytes ({MAX_FILE_BYTES >> 20} MiB) for one image")


def _size_of(f: BinaryIO) -> int | None:
    """Bytes in an open file from where it stands (None when it cannot seek): its size, without reading it."""
    try:
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
    except (OSError, ValueError, AttributeError):
        return None
    return end - here


def _check_decode_bytes(im: Image.Image) -> None:
    """Refuse, from the header, an image whose decode would hold more than :data:`MAX_DECODE_BYTES`."""
    mode = "P transparent" if im.mode == "P" and "transparency" in im.info else im.mode
    need = im.width * im.height * DECODE_BYTES_PER_PIXEL.get(mode, max(DECODE_BYTES_PER_PIXEL.values()))
    if need > MAX_DECODE_BYTES:
        raise ImageError(
            f"image too large: {im.width}x{im.height} pixels of mode {im.mode} need {need / 2**20:.0f} MiB to decode, "
            f"over the limit of {MAX_DECODE_BYTES >> 20} MiB"
        )


class _HeaderBudget:
    """What Pillow has read of a file while it parses the header: over :data:`HEADER_BYTES`, the file is no image.

    Why: Pillow's JPEG parser skips junk one byte at a time, so the time to refuse a file of JPEG
    magic and zeros grew with its size. :meth:`parsed` lifts the bound once the header is read.
    Counted where it is cheap: for a path, at the disk under the file's buffer (one call per buffer
    refill, not one per byte Pillow asks for; a decode costs the same as with a plain ``open``).
    """

    taken = 0
    limit: float = HEADER_BYTES

    def _spend(self, n: int) -> None:
        self.taken += n
        if self.taken > self.limit:
            raise ImageError(f"corrupt image: no image header in its first {HEADER_BYTES >> 20} MiB")

    def parsed(self) -> None:
        self.limit = math.inf


class _CountedFile(io.FileIO, _HeaderBudget):
    """An image file opened by path, counting what its buffer takes from the disk."""

    def readinto(self, b: Any) -> int | None:
        n = super().readinto(b)
        self._spend(n or 0)
        return n


class _CountedReads(_HeaderBudget):
    """A file object given by the caller, counting what is read through it; the rest is the file's own."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._spend(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _sniff_format(f: BinaryIO) -> str | None:
    """The format a file's leading bytes claim, to tell "corrupt image" from "not an image"."""
    try:
        f.seek(0)
        head = f.read(8)
    except (OSError, ValueError):
        return None
    if not head:
        return ""
    return next((fmt for magic, fmt in IMAGE_MAGIC.items() if head.startswith(magic)), None)


def _decode(f: BinaryIO, header: _HeaderBudget, spec: PreprocessSpec) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the limit; PIL's warning threshold would
            # otherwise refuse images a model's metadata explicitly allows.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                header.parsed()
                w, h = im.size
                if w * h > spec.max_pixels:
                    raise ImageError(
                        f"image too large: {w}x{h} pixels exceeds the limit of {spec.max_pixels} "
                        "(possible decompression bomb)"
                    )
                if spec.jpeg_draft and im.format == "JPEG":
                    im.draft("RGB", (spec.width, spec.height))
                _check_decode_bytes(im)
                im.load()
                rgb = _resized(_to_rgb(_upright(im)), spec)
                arr = np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large (possible decompression bomb): {e}") from e
    except UnidentifiedImageError:
        header.parsed()
        fmt = _sniff_format(f)
        if fmt == "":
            raise ImageError("empty file") from None
        if fmt:
            raise ImageError(f"corrupt image: starts like a {fmt} file but its header cannot be parsed") from None
        raise ImageError("not an image (format not recognised)") from None
    except OSError as e:
        if e.errno is not None:  # the OS failed to read it (EIO, ...): not the decoder's verdict
            raise ImageError(f"unreadable: {e.strerror or e}") from e
        raise _decode_error(e) from e
    except (SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise _decode_error(e) from e
    if arr.shape != (spec.height, spec.width, 3):  # defensive: a plugin returned something odd
        raise ImageError(f"decoded to unexpected shape {arr.shape}")
    return arr


def fit_box(w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Where a ``w x h`` image goes in a ``width x height`` frame with its aspect kept: (x, y, new_w, new_h).

    The rule embedders copy: ``s = min(width / w, height / h)``, ``new = floor(size * s + 0.5)``
    (at least 1), placed at ``floor((width - new_w) / 2), floor((height - new_h) / 2)``; the rest
    of the frame is black (0, 0, 0).
    """
    s = min(width / w, height / h)
    nw, nh = max(1, min(width, math.floor(w * s + 0.5))), max(1, min(height, math.floor(h * s + 0.5)))
    return (width - nw) // 2, (height - nh) // 2, nw, nh


def _resized(rgb: Image.Image, spec: PreprocessSpec) -> Image.Image:
    if rgb.size == (spec.width, spec.height):
        return rgb
    if not spec.keep_aspect:
        return rgb.resize((spec.width, spec.height), _FILTERS[spec.resize])
    x, y, nw, nh = fit_box(rgb.width, rgb.height, spec.width, spec.height)
    frame = Image.new("RGB", (spec.width, spec.height), (0, 0, 0))
    frame.paste(rgb if rgb.size == (nw, nh) else rgb.resize((nw, nh), _FILTERS[spec.resize]), (x, y))
    return frame


def _decode_error(e: BaseException) -> ImageError:
    msg = str(e) or type(e).__name__
    if "truncated" in msg.lower():
        return ImageError(f"truncated image: {msg}")
    return ImageError(f"corrupt image: {msg}")


def load_image_bytes(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """:func:`load_image` for bytes already in memory (Ray reads files as bytes)."""
    if not data:
        raise ImageError("empty file")
    return load_image(io.BytesIO(data), spec)
