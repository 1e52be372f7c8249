"""The pictures of one cell in the report: a zoom on the white cell and the whole field, as JPEG data URIs.

Why a zoom: the shipped model does not look at the whole field. Its first layer
(``training.models.CellCrop``) centres a 160-pixel window on the stained nucleus of the
field resized to 320x240 and classifies that window, so a reviewer should see the same
window. The evaluation side never imports torch, so the centre is found here the same
simple way in numpy: the field is decoded and fitted into the frame exactly as the model sees it
(:func:`wbc_batch.inference.preprocess.load_image`, aspect kept), the blue-minus-red map is averaged over
4x4 blocks and then over 9x9 blocks of those (at the edges, the mean of the blocks inside),
and the window is centred on the first maximum. That is CellCrop's arithmetic with the
shipped model's geometry (training config ``size [240, 320]``, ``crop [160, 128]``); for a
model with another geometry the zoom is still the strongest blue-minus-red blob (the
stained nucleus), not necessarily that model's exact window.

The window is cut from the original image (black outside it, as the model's zero padding),
except where that padding would be most of the picture (a cell at the field's edge): the window is
then cut down to the part inside the image, since a reviewer learns nothing from black (:func:`visible_box`).
Both pictures are kept near their own resolution (the zoom at most 256 px, the field at
most 480 px on its long side), so a click can enlarge them without inventing detail.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..inference.preprocess import PreprocessSpec, fit_box, load_image

#: The shipped model's view: the image fitted into 320x240 (aspect kept, black padding), a 160 px window, found on
#: a 4x-pooled 9x9-smoothed map.
MODEL_VIEW = PreprocessSpec(height=240, width=320, keep_aspect=True)
WINDOW = 160
STRIDE = 4
BLUR = 9
ZOOM_MAX = 256
FIELD_MAX = 480
JPEG_QUALITY = 82


@dataclass(frozen=True)
class CellImages:
    """Data URIs of the zoom around the cell and of the whole field."""

    zoom: str
    field: str


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over each k x k neighbourhood that lies inside ``a`` (avg_pool2d, stride 1, count_include_pad=False)."""
    r = k // 2

    def box_sum(m: np.ndarray) -> np.ndarray:
        c = np.pad(np.pad(m, r).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]

    return box_sum(a.astype(np.float64)) / box_sum(np.ones_like(a, dtype=np.float64))


def nucleus_centre(rgb: np.ndarray) -> tuple[float, float]:
    """(x, y) in pixels of ``rgb`` (H, W, 3 uint8): the centre of the strongest blue-minus-red blob."""
    h, w = rgb.shape[0] // STRIDE, rgb.shape[1] // STRIDE
    x = rgb[: h * STRIDE, : w * STRIDE].astype(np.float32)
    score = (x[..., 2] - x[..., 0]).reshape(h, STRIDE, w, STRIDE).mean(axis=(1, 3))
    ky, kx = divmod(int(np.argmax(_box_mean(score, BLUR))), w)
    return kx * STRIDE + STRIDE / 2, ky * STRIDE + STRIDE / 2


def _jpeg_uri(im) -> str:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def zoom_box(cx: float, cy: float, w: int, h: int) -> tuple[int, int, int, int]:
    """The model's window around (cx, cy) of :data:`MODEL_VIEW`, in the pixels of the ``w x h`` image it was fitted from:
    the same square there, whatever the image's shape (mapped back through the padding, as the model saw it)."""
    x0, y0, nw, nh = fit_box(w, h, MODEL_VIEW.width, MODEL_VIEW.height)
    sx, sy = w / nw, h / nh
    half = WINDOW / 2
    return (round((cx - x0 - half) * sx), round((cy - y0 - half) * sy), round((cx - x0 + half) * sx), round((cy - y0 + half) * sy))


#: The window is cut down to the image when less than this share of it lies inside the image.
MIN_INSIDE = 0.5


def visible_box(box: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    """``box`` as the model saw it, or its part inside the ``w x h`` image when the padding would dominate it."""
    x0, y0, x1, y1 = box
    inside = (max(0, x0), max(0, y0), min(w, x1), min(h, y1))
    area = max(0, inside[2] - inside[0]) * max(0, inside[3] - inside[1])
    return inside if 0 < area < MIN_INSIDE * (x1 - x0) * (y1 - y0) else box


def cell_images(path: Path) -> CellImages | None:
    """The zoom and the field of the image at ``path``, or None when it cannot be read (moved, corrupt)."""
    from PIL import Image

    try:
        cx, cy = nucleus_centre(load_image(path, MODEL_VIEW))
        with Image.open(path) as im:
            im.draft("RGB", (FIELD_MAX, FIELD_MAX))  # JPEG: decode at a reduced scale when large
            im = im.convert("RGB")
            box = visible_box(zoom_box(cx, cy, im.width, im.height), im.width, im.height)
            bw, bh = box[2] - box[0], box[3] - box[1]
            scale = min(1.0, ZOOM_MAX / max(bw, bh))
            zoom = im.crop(box).resize((max(1, round(bw * scale)), max(1, round(bh * scale))), Image.Resampling.BILINEAR)
            im.thumbnail((FIELD_MAX, FIELD_MAX))
            return CellImages(zoom=_jpeg_uri(zoom), field=_jpeg_uri(im))
    except Exception:  # noqa: BLE001 - missing, moved or corrupt image: the report shows a placeholder
        return None
