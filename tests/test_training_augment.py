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
