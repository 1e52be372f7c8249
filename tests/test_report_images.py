"""report_images: the zoom is centred where the model's CellCrop centres its window; both pictures are small JPEGs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from PIL import Image

from wbc_batch.evaluation.report_images import BLUR, MODEL_VIEW, WINDOW, _box_mean, cell_images, nucleus_centre, visible_box, zoom_box
from wbc_batch.inference.preprocess import load_image

IMAGES = sorted(SAMPLE.rglob("*.jpeg"))


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_box_mean_is_the_mean_over_the_inside_of_each_window():
    a = np.random.default_rng(0).normal(size=(7, 11))
    got = _box_mean(a, 5)
    for y in range(7):
        for x in range(11):
            want = a[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].mean()
            assert got[y, x] == pytest.approx(want)


def test_nucleus_centre_finds_a_blue_blob():
    rgb = np.full((240, 320, 3), (200, 120, 120), np.uint8)  # reddish background
    rgb[100:140, 220:260] = (60, 40, 170)  # a purple-blue nucleus centred at (240, 120)
    cx, cy = nucleus_centre(rgb)
    assert abs(cx - 240) <= 4 and abs(cy - 120) <= 4


@pytest.mark.torch
def test_nucleus_centre_matches_cellcrop():
    """Exactly the centre the shipped model's in-graph crop computes, on every sample image."""
    torch = pytest.importorskip("torch")
    from wbc_batch.training.models import CellCrop

    crop = CellCrop(WINDOW, 128)
    assert crop.blur == BLUR
    for p in IMAGES:
        a = load_image(p, MODEL_VIEW)
        want = crop.centres(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float())[0].tolist()
        assert nucleus_centre(a) == tuple(want), p.name


def test_cell_images_sizes():
    """Blood-cell fields are 320x240: the zoom is the 160 px window at its own resolution, the field whole."""
    im = cell_images(IMAGES[0])
    assert im is not None
    assert _decode(im.zoom).size == (WINDOW, WINDOW)
    assert _decode(im.field).size == Image.open(IMAGES[0]).size == (320, 240)


def test_cell_images_of_a_large_image_are_bounded(tmp_path):
    big = tmp_path / "big.png"
    Image.open(IMAGES[0]).resize((1280, 960)).save(big)
    im = cell_images(big)
    assert _decode(im.zoom).size == (256, 256) and _decode(im.field).size == (480, 360)


def test_cell_images_unreadable(tmp_path):
    (tmp_path / "bad.jpeg").write_bytes(b"not an image")
    assert cell_images(tmp_path / "bad.jpeg") is None
    assert cell_images(Path(tmp_path / "missing.jpeg")) is None


def test_the_zoom_of_a_square_single_cell_image_is_square_and_on_the_cell(tmp_path):
    # The model fits a square image into 320x240 with black bars; the zoom was found on a *stretched* view and
    # cut a 150x200 box from a 300x300 image (a distorted picture of the cell).
    rgb = np.full((300, 300, 3), (205, 130, 140), np.uint8)
    rgb[180:220, 80:120] = (60, 40, 170)  # nucleus centred at (100, 200)
    path = tmp_path / "cell.png"
    Image.fromarray(rgb).save(path)
    cx, cy = nucleus_centre(load_image(path, MODEL_VIEW))
    x0, y0, x1, y1 = zoom_box(cx, cy, 300, 300)
    assert x1 - x0 == y1 - y0 == 200  # the 160 px window at 300/240 source pixels per view pixel
    assert abs((x0 + x1) / 2 - 100) <= 5 and abs((y0 + y1) / 2 - 200) <= 5
    assert _decode(cell_images(path).zoom).size == (200, 200)


def test_the_zoom_box_of_a_field_is_the_window_itself():
    assert zoom_box(200.0, 100.0, 320, 240) == (120, 20, 280, 180)
    assert zoom_box(200.0, 100.0, 640, 480) == (240, 40, 560, 360)


def test_the_zoom_is_cut_to_the_image_where_padding_would_be_most_of_it(tmp_path):
    """A nucleus in the field's corner: the model's 160 px window lies mostly outside the image, so the zoom shows the
    part inside (no black square); a window mostly inside stays the model's view."""
    assert visible_box((-100, -100, 60, 60), 320, 240) == (0, 0, 60, 60)  # 14% inside
    assert visible_box((-40, 10, 120, 170), 320, 240) == (-40, 10, 120, 170)  # 75% inside: as the model saw it
    rgb = np.full((240, 320, 3), (205, 130, 140), np.uint8)
    rgb[0:24, 0:24] = (60, 40, 170)  # nucleus in the top-left corner
    path = tmp_path / "corner.png"
    Image.fromarray(rgb).save(path)
    x0, y0, x1, y1 = zoom_box(*nucleus_centre(load_image(path, MODEL_VIEW)), 320, 240)
    assert x0 < 0 and y0 < 0 and (x1 * y1) < 0.5 * WINDOW * WINDOW
    zoom = np.asarray(_decode(cell_images(path).zoom))
    assert zoom.shape[:2] == (y1, x1) and zoom.min(axis=2).max() > 0 and (zoom.max(axis=2) > 30).all()  # no black band
