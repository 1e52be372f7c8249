"""Augmentation: drawing the parameters is the only random step; applying them is pure and exact."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from wbc_batch.training import augment  # noqa: E402


def _draw(seed: int, n: int = 5) -> augment.AugmentParams:
    return augment.draw(n, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_a_seed_draws_the_same_parameters_in_the_documented_ranges():
    a, b = _draw(3), _draw(3)
    for x, y in ((a.geometry.angle, b.geometry.angle), (a.geometry.shift, b.geometry.shift), (a.stain.gain, b.stain.gain)):
        assert torch.equal(x, y)
    g, s = a.geometry, a.stain
    assert g.angle.abs().max() <= math.pi and ((g.scale >= 0.9) & (g.scale <= 1.1)).all()
    assert set(g.flip.tolist()) <= {-1.0, 1.0} and g.shift.shape == (5, 2) and g.shift.abs().max() <= 1
    assert s.gain.shape == (5, 3) and ((s.gain >= 0.92) & (s.gain <= 1.08)).all()
    assert ((s.saturation >= 0.75) & (s.saturation <= 1.25)).all()


def test_apply_is_pure_and_repeatable():
    p = _draw(0, 2)
    x = torch.rand(2, 3, 24, 32) * 255
    before = x.clone()
    out1 = augment.jitter_stain(augment.rotate_field(x, p.geometry), p.stain)
    out2 = augment.jitter_stain(augment.rotate_field(x, p.geometry), p.stain)
    assert torch.equal(out1, out2) and torch.equal(x, before)
    assert out1.min() >= 0 and out1.max() <= 255


def _identity_geometry(n: int) -> augment.GeometryParams:
    return augment.GeometryParams(torch.zeros(n), torch.ones(n), torch.ones(n), torch.zeros(n, 2))


def test_identity_parameters_are_the_identity():
    x = torch.rand(2, 3, 24, 32) * 255
    assert torch.allclose(augment.rotate_field(x, _identity_geometry(2)), x, atol=1e-3)
    assert torch.equal(augment.window_affine(_identity_geometry(1), 160)[0], torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    one = torch.ones(2)
    stain = augment.StainParams(torch.ones(2, 3), one, one, one)
    assert torch.allclose(augment.jitter_stain(x, stain), x, atol=1e-3)


def test_a_half_turn_with_a_flip_mirrors_vertically():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = augment.GeometryParams(torch.full((2,), math.pi), torch.ones(2), -torch.ones(2), torch.zeros(2, 2))
    assert torch.allclose(augment.rotate_field(x, p), x.flip(2), atol=1e-3)


def test_colour_draw_is_seeded_and_in_its_documented_ranges():
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b = augment.draw_colour(64, gen(5), torch.device("cpu")), augment.draw_colour(64, gen(5), torch.device("cpu"))
    assert all(getattr(a, f) is getattr(b, f) is None or torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    assert ((a.hed_scale[:, :2] >= 0.65) & (a.hed_scale[:, :2] <= 1.35)).all() and (a.hed_shift.abs() <= 0.03).all()
    assert ((a.gain[:, 2] >= 0.7) & (a.gain[:, 2] <= 1.1)).all() and (a.hue.abs() <= 0.08).all()
    assert ((a.gamma >= 0.65 - 1e-6) & (a.gamma <= 1.5 + 1e-6)).all()
    assert (a.blur == 0).sum() > 10 and ((a.blur == 0) | ((a.blur >= 0.3) & (a.blur <= 1.6))).all()
    # The strong mode replaces the mild stain jitter; geometry is drawn first either way.
    p, q = augment.draw(4, gen(1), torch.device("cpu"), colour="strong"), augment.draw(4, gen(1), torch.device("cpu"))
    assert p.stain is None and p.colour is not None and q.colour is None and torch.equal(p.geometry.angle, q.geometry.angle)
    with pytest.raises(ValueError, match="unknown colour"):
        augment.draw(1, gen(0), torch.device("cpu"), colour="loud")


def test_wide_colour_draws_the_same_stream_as_strong_with_wider_hue_and_saturation():
    # Same numbers in the same order: only the hue and saturation scales differ, so the recipes are
    # comparable image for image and a strong run's seed still reproduces it.
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    s, w = augment.draw(256, gen(), torch.device("cpu"), colour="strong"), augment.draw(256, gen(), torch.device("cpu"), colour="wide")
    assert torch.equal(s.geometry.angle, w.geometry.angle) and torch.equal(s.colour.gamma, w.colour.gamma)
    assert torch.equal(s.colour.hed_scale, w.colour.hed_scale) and torch.equal(s.colour.contrast, w.colour.contrast)
    assert torch.allclose(w.colour.hue, s.colour.hue * (0.12 / 0.08), atol=1e-6)
    u = (s.colour.saturation - 0.6) / 0.8  # the shared uniform draw
    assert torch.allclose(w.colour.saturation, 0.25 + u * 1.35, atol=1e-5)
    assert w.colour.saturation.min() < 0.4 and w.colour.saturation.max() > 1.45 and w.colour.hue.abs().max() > 0.1


def test_colour_apply_is_pure_and_identity_parameters_are_the_identity():
    x = torch.rand(3, 3, 20, 24) * 250 + 3
    before = x.clone()
    assert torch.allclose(augment.apply_colour(x, augment.identity_colour(3)), x, atol=2e-3)
    p = augment.draw_colour(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    y1, y2 = augment.apply_colour(x, p), augment.apply_colour(x, p)
    assert torch.equal(y1, y2) and torch.equal(x, before) and y1.min() >= 0 and y1.max() <= 255


def test_colour_keeps_black_padding_black_and_each_step_does_what_it_says():
    x = torch.full((1, 3, 8, 8), 128.0)
    x[..., :2] = 0  # padding of an aspect-kept decode
    p = augment.draw_colour(1, torch.Generator().manual_seed(2), torch.device("cpu"))
    assert augment.apply_colour(x, p)[..., :2].abs().max() == 0
    ident = augment.identity_colour(1)
    # Doubling haematoxylin darkens a blue-purple pixel most in red (H absorbs red); a grey stays grey under hue turns.
    px = torch.tensor([120.0, 80.0, 170.0]).view(1, 3, 1, 1)
    h2 = augment.jitter_hed(px, torch.tensor([[2.0, 1.0, 1.0]]), torch.zeros(1, 3)).flatten()
    assert (h2 < px.flatten()).all() and int(torch.argmax(px.flatten() - h2)) == 0
    grey = torch.full((1, 3, 2, 2), 100.0)
    assert torch.allclose(augment._mix(grey, augment.hue_matrix(torch.tensor([0.25]))), grey, atol=1e-3)
    from dataclasses import replace

    blurred = augment.apply_colour(torch.rand(1, 3, 16, 16) * 200 + 20, replace(ident, blur=torch.tensor([1.5])))
    assert blurred.std() < 60  # a uniform-noise image loses contrast when blurred


def test_jpeg_share_adds_draws_after_the_others_and_none_for_zero():
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    g0, g1 = gen(7), gen(7)
    plain, jpeg = augment.draw_colour(200, g0, torch.device("cpu")), augment.draw_colour(200, g1, torch.device("cpu"), jpeg=0.5)
    # Share 0 draws nothing more (an older run's seed reproduces); a share keeps every earlier draw as it was.
    assert plain.jpeg is None and all(torch.equal(getattr(plain, f), getattr(jpeg, f)) for f in ("hed_scale", "hue", "blur"))
    q = jpeg.jpeg
    assert 60 < int((q > 0).sum()) < 140 and ((q == 0) | ((q >= 10) & (q <= 90))).all() and torch.equal(q, q.round())
    assert torch.rand(1, generator=g0) != torch.rand(1, generator=g1)


def test_jpeg_recompression_is_libjpeg_at_the_drawn_quality_and_keeps_padding_black():
    import io
    from dataclasses import replace
    from pathlib import Path

    import numpy as np
    from PIL import Image

    src = sorted((Path(__file__).parents[1] / "sample_data").rglob("*.jpeg"))[0]
    img = torch.from_numpy(np.asarray(Image.open(src).convert("RGB"))[:96, :128].copy()).permute(2, 0, 1)
    x = torch.stack([img, img]).float()
    y = augment.compress_jpeg(x, torch.tensor([0.0, 10.0]))
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=10)
    assert torch.equal(y[0], x[0]) and torch.equal(y[1], torch.from_numpy(np.asarray(Image.open(buf))).permute(2, 0, 1).float())
    assert (y[1] - x[1]).abs().mean() > (augment.compress_jpeg(x[1:], torch.tensor([90.0]))[0] - x[1]).abs().mean()
    x[..., :16] = 0
    p = replace(augment.identity_colour(2), jpeg=torch.tensor([10.0, 10.0]))
    assert augment.apply_colour(x, p)[..., :16].abs().max() == 0


def test_hsv_colour_is_wide_with_half_the_hue_turns_made_in_hsv():
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    w, h = augment.draw(256, gen(), torch.device("cpu"), colour="wide"), augment.draw(256, gen(), torch.device("cpu"), colour="hsv")
    for a, b in ((w.colour.hue, h.colour.hue), (w.colour.saturation, h.colour.saturation), (w.colour.blur, h.colour.blur)):
        assert torch.equal(a, b)  # the mask is drawn last: wide's stream is untouched
    assert w.colour.hsv is None and h.colour.hsv.dtype == torch.bool and 96 < int(h.colour.hsv.sum()) < 160
    x = torch.rand(256, 3, 6, 6) * 240 + 10
    yw, yh = augment.apply_colour(x, w.colour), augment.apply_colour(x, h.colour)
    keep = ~h.colour.hsv
    assert torch.allclose(yw[keep], yh[keep], atol=1e-3) and not torch.allclose(yw[~keep], yh[~keep], atol=1.0)


def test_hsv_turn_is_torchvision_adjust_hue_batched():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(4, 3, 9, 11) * 255
    turns = torch.tensor([-0.12, -0.05, 0.0, 0.3])
    y = augment.turn_hue_hsv(x, turns)
    for i, t in enumerate(turns.tolist()):
        assert torch.allclose(y[i] / 255, tvf.adjust_hue(x[i] / 255, t), atol=1e-4)
    assert torch.allclose(y.amax(1), x.amax(1), atol=1e-3) and torch.allclose(y.amin(1), x.amin(1), atol=1e-3)
    assert torch.allclose(augment.turn_hue_hsv(x, torch.zeros(4)), x, atol=1e-3)
