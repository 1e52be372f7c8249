"""Batch augmentation, split as torchvision's v2 transforms are: draw the random parameters, then apply them.

The ``draw_*`` functions are the only ones that consume the generator (in a fixed order: a
seed reproduces a run); the ``apply`` side (:func:`field_theta`, :func:`window_affine`,
:func:`rotate_field`, :func:`jitter_stain`) is pure tensor arithmetic, so a test or a
report can replay exactly what a batch saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GeometryParams:
    """Per image: rotation angle (radians), zoom, flip sign (+-1) and a unit shift in [-1, 1]^2 (N, 2)."""

    angle: torch.Tensor
    scale: torch.Tensor
    flip: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class StainParams:
    """Per image: per-channel gain (N, 3), brightness, contrast and saturation factors (N,)."""

    gain: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor


@dataclass(frozen=True)
class AugmentParams:
    geometry: GeometryParams
    stain: StainParams


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(dev)


def draw_geometry(n: int, gen: torch.Generator, dev: torch.device) -> GeometryParams:
    """Any rotation, a flip, zoom 0.9-1.1 and a shift (scaled by the apply side)."""
    angle = _uniform(n, -math.pi, math.pi, gen, dev)
    scale = _uniform(n, 0.9, 1.1, gen, dev)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(dev)
    shift = torch.stack([_uniform(n, -1, 1, gen, dev), _uniform(n, -1, 1, gen, dev)], dim=1)
    return GeometryParams(angle, scale, flip, shift)


def draw_stain(n: int, gen: torch.Generator, dev: torch.device) -> StainParams:
    """Gain +-8% per channel, brightness +-15%, contrast +-20%, saturation +-25%."""
    gain = torch.rand(n, 3, generator=gen).to(dev) * 0.16 + 0.92
    return StainParams(gain, _uniform(n, 0.85, 1.15, gen, dev), _uniform(n, 0.8, 1.2, gen, dev), _uniform(n, 0.75, 1.25, gen, dev))


def draw(n: int, gen: torch.Generator, dev: torch.device) -> AugmentParams:
    """Geometry, then stain: the order is part of what a seed reproduces."""
    return AugmentParams(draw_geometry(n, gen, dev), draw_stain(n, gen, dev))


def field_theta(p: GeometryParams, h: int, w: int) -> torch.Tensor:
    """(N, 2, 3) ``affine_grid`` maps: the rotation in pixel space, in its normalised coordinates; shift 10%."""
    cos, sin = torch.cos(p.angle) / p.scale, torch.sin(p.angle) / p.scale
    theta = torch.zeros(len(cos), 2, 3, device=cos.device)
    theta[:, 0, 0] = cos * p.flip
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * p.flip * w / h
    theta[:, 1, 1] = cos
    theta[:, :, 2] = p.shift * 0.1
    return theta


def window_affine(p: GeometryParams, window: float | torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) maps of crop-window offsets (pixels): rotation about the cell, flip, zoom, shift of 8%."""
    cos, sin = torch.cos(p.angle) / p.scale, torch.sin(p.angle) / p.scale
    a = torch.zeros(len(cos), 2, 3, device=cos.device)
    a[:, 0, 0] = cos * p.flip
    a[:, 0, 1] = -sin
    a[:, 1, 0] = sin * p.flip
    a[:, 1, 1] = cos
    a[:, :, 2] = p.shift * (0.08 * (window.view(-1, 1) if isinstance(window, torch.Tensor) else window))
    return a


def rotate_field(x: torch.Tensor, p: GeometryParams) -> torch.Tensor:
    """Whole-field geometry on a float NCHW batch (reflection at the borders)."""
    grid = F.affine_grid(field_theta(p, x.shape[2], x.shape[3]), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def jitter_stain(x: torch.Tensor, p: StainParams) -> torch.Tensor:
    """Stain / illumination on a float NCHW 0..255 batch: gain, brightness, contrast, saturation."""
    n = x.shape[0]
    x = x * p.gain.view(n, 3, 1, 1) * p.brightness.view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * p.contrast.view(n, 1, 1, 1) + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * p.saturation.view(n, 1, 1, 1) + gray
    return x.clamp(0, 255)
