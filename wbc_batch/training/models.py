"""Networks, each wrapped so that it takes what classify feeds: uint8 RGB, NHWC.

Normalisation and the layout change live inside the exported graph (:class:`Deployable`),
so an embedder in any language only decodes and resizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import archs
from .archs import STAIN_MEAN, STAIN_STD, net_input_size

#: A pixel (or block mean) with R+G+B at most this is padding, a rotation border or their JPEG ringing, never
#: stain or background: far darker than any stained nucleus. The crop and the balance both skip it.
PADDING_MAX_SUM = 60


DEFAULT_ARCH = archs.DEFAULT_ARCH


def build(arch: str, num_classes: int, size: tuple[int, int]) -> nn.Module:
    """The registry's network (:mod:`.archs`), randomly initialised, for a network input of ``size``; a module its
    builder needs and cannot find (timm) is a usage error naming the install, for train, export and --init alike."""
    entry = archs.get(arch)
    archs.require_modules(entry)
    return entry.builder(num_classes, size)


def default_size(arch: str) -> tuple[int, int]:
    return archs.get(arch).default_size


def default_crop(arch: str) -> tuple[int, int]:
    return archs.get(arch).default_crop


class CellCrop(nn.Module):
    """Centres a square window on the white cell and samples it to ``out`` x ``out``.

    Why: each field holds one stained white cell among red cells; the classes differ in nucleus
    shape and granule colour, detail that a whole-field downscale blurs away, while the red
    cells around it are what differs between smears.  The nucleus is the field's strongest
    stain blob; its position is found on a 4x-pooled, 9x9-smoothed map (small platelets lose
    to the nucleus there).  Everything is plain tensor arithmetic, so it exports to ONNX
    (AveragePool, ArgMax, GridSample) and embedders still feed the decoded field only.

    ``follow=False``: a fixed ``window``-pixel square, nucleus = strongest blue-minus-red blob.
    ``follow=True``: the window follows the nucleus' size (``window`` pixels for a nucleus of
    :attr:`ref_diameter` pixels), so a cell is seen at one scale whatever the magnification or
    the image size (a 320x240 field or a cell analyser's single-cell crop).  The nucleus signal
    is then blue-minus-red plus half the green absorbance: nuclei are dark *and* blue in every
    stain seen so far, red cells are only dark, yellow or white backgrounds are neither.
    Padding (pure black, from aspect-keeping decode) never counts as stain.
    """

    stride = 4
    blur = 9
    #: Nucleus diameter (pixels, the size signal's equivalent-disc measure) at which the window is ``window``.
    ref_diameter = 80.0
    #: The window stays within [window / 4, window * 3]: a failed size estimate cannot blow up or vanish.
    clamp = (0.25, 3.0)
    #: The nucleus is measured within this fraction of the current window estimate on each side of the centre
    #: (a window is about twice the nucleus, so 0.75 holds a nucleus whose strongest point is at its edge).
    reach = 0.75
    #: Passes of measure-then-grow; three converge on bands up to 4x a 20-px-high one (tests/test_train.py).
    rounds = 3

    def __init__(self, window: int, out: int, follow: bool = False) -> None:
        super().__init__()
        self.window = int(window)
        self.out = int(out)
        self.follow = bool(follow)
        unit = (torch.arange(self.out, dtype=torch.float32) + 0.5 - self.out / 2) / self.out
        self.register_buffer("unit_offsets", unit, persistent=False)
        # Output pixel centres as offsets from the window centre, in input pixels (fixed window).
        self.register_buffer("offsets", unit * self.window, persistent=False)
        kernel = torch.zeros(1, 3, self.stride, self.stride)
        if self.follow:
            kernel[0, 0], kernel[0, 1], kernel[0, 2] = -1.0, -0.5, 1.0
        else:
            kernel[0, 0], kernel[0, 2] = -1.0, 1.0
        self.register_buffer("score_kernel", kernel / self.stride**2, persistent=False)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H/4, W/4) stride-pooled nucleus signal (one strided conv: pooling is linear)."""
        score = nn.functional.conv2d(x, self.score_kernel, stride=self.stride)
        if self.follow:
            # + 0.5 * 255 completes "0.5 * (255 - G)". Near-black pixels (padding, rotation borders,
            # their JPEG ringing: R+G+B <= 60, far darker than any stained nucleus) score 0.
            valid = nn.functional.avg_pool2d((x.sum(1, keepdim=True) > PADDING_MAX_SUM).to(x.dtype), self.stride)
            score = (score + 127.5) * valid
        return score

    def locate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) cell centres (x, y) and (N,) window sides, in input pixels, for a float NCHW 0..255 RGB batch."""
        score = self._score(x)
        smooth = nn.functional.avg_pool2d(score, self.blur, 1, self.blur // 2, count_include_pad=False)
        wp = smooth.shape[-1]
        k = torch.argmax(smooth.flatten(1), dim=1).to(torch.float32)
        ky = torch.floor(k / wp)
        kx = k - ky * wp
        centres = torch.stack([kx, ky], dim=1) * self.stride + self.stride / 2
        if not self.follow:
            return centres, torch.full((x.shape[0],), float(self.window), device=x.device)
        return centres, self._window_sides(score, kx, ky)

    def _window_sides(self, score: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
        """Window side from the nucleus' area: cells above half the peak signal, in a box around the centre that grows
        with the estimate (:attr:`reach` of the side, at least half the nominal window; :attr:`rounds` passes).

        Why it grows: a fixed box of half the nominal window clipped a nucleus seen at 2-3x, or a lobed one whose
        strongest point is a lobe, so the window stopped following the cell (at 2x it was 0.85 of twice the 1x window
        on pbc/train, at 3x 0.63; now 0.95 and 0.83, the rest cut off by the 240-px frame itself).
        """
        n, _, hp, wp = score.shape
        peak = score.flatten(1).max(dim=1).values.view(n, 1, 1, 1)
        gy = torch.arange(hp, device=score.device, dtype=torch.float32).view(1, 1, hp, 1)
        gx = torch.arange(wp, device=score.device, dtype=torch.float32).view(1, 1, 1, wp)
        far = torch.maximum((gx - kx.view(n, 1, 1, 1)).abs(), (gy - ky.view(n, 1, 1, 1)).abs())
        hot = (score > 0.5 * peak).to(torch.float32)
        lo, hi = self.clamp
        side = torch.full((n,), float(self.window), device=score.device)
        for _ in range(self.rounds):
            reach = torch.clamp(side * self.reach, min=self.window / 2) / self.stride
            area = (hot * (far <= reach.view(n, 1, 1, 1)).to(torch.float32)).sum(dim=(1, 2, 3)) * self.stride**2
            side = torch.clamp(self.window * 2.0 * torch.sqrt(area / torch.pi) / self.ref_diameter, lo * self.window, hi * self.window)
        return side

    def centres(self, x: torch.Tensor) -> torch.Tensor:
        return self.locate(x)[0]

    def sample(self, x: torch.Tensor, centres: torch.Tensor, windows: torch.Tensor | None = None, affine: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the window around ``centres`` (sides ``windows``, default the fixed one); ``affine`` (N, 2, 3) maps window offsets for augmentation."""
        n, _, h, w = x.shape
        if affine is None:
            # Separate x and y planes, each a per-sample scalar times a constant plus a scalar: onnxruntime's fast broadcast path.
            if windows is None:
                ox, oy = self.offsets.view(1, 1, -1, 1) * (2.0 / w), self.offsets.view(1, -1, 1, 1) * (2.0 / h)
            else:
                ox = self.unit_offsets.view(1, 1, -1, 1) * (windows * (2.0 / w)).view(n, 1, 1, 1)
                oy = self.unit_offsets.view(1, -1, 1, 1) * (windows * (2.0 / h)).view(n, 1, 1, 1)
            gx = ox + (centres[:, 0] * (2.0 / w) - 1.0).view(n, 1, 1, 1)
            gy = oy + (centres[:, 1] * (2.0 / h) - 1.0).view(n, 1, 1, 1)
            grid = torch.cat([gx.expand(n, self.out, self.out, 1), gy.expand(n, self.out, self.out, 1)], dim=3)
        else:
            side = torch.full((n,), float(self.window), device=x.device) if windows is None else windows
            uy, ux = torch.meshgrid(self.unit_offsets, self.unit_offsets, indexing="ij")
            pts = torch.stack([ux, uy], dim=-1).reshape(1, -1, 2) * side.view(n, 1, 1)  # (n, out*out, 2) as (dx, dy)
            px = pts @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2] + centres[:, None, :]
            grid = (px * torch.tensor([2.0 / w, 2.0 / h], device=x.device) - 1.0).reshape(n, self.out, self.out, 2)
        return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres, windows = self.locate(x)
        return self.sample(x, centres, windows if self.follow else None)


class BackgroundBalance(nn.Module):
    """Per-image white balance on the slide's background: each channel scaled so the brightest area matches ``ref``.

    Why: the background of a smear is the light source seen through glass, so its colour is the
    lamp, the camera's white balance and the mounting (a yellow-toned lab, a pink one), not the cells.
    Dividing it out maps every lab's images towards the training data's background colour.  The
    brightest area is the per-channel maximum of 8x8-pixel means (one bright pixel cannot win);
    near-black padding never counts; gains stay within [1/2, 2] so a field without background
    (a cell filling the frame) is only mildly changed.  Plain AveragePool/ReduceMax/Clip in ONNX.
    """

    block = 8
    gain_range = (0.5, 2.0)

    def __init__(self, ref: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("ref", torch.tensor([float(v) for v in ref]).view(1, 3, 1, 1))

    @classmethod
    def brightest(cls, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 1, 1) per-channel brightest block mean of a float NCHW 0..255 RGB batch (padding excluded)."""
        pooled = nn.functional.avg_pool2d(x, cls.block, ceil_mode=False)
        valid = (pooled.sum(1, keepdim=True) > PADDING_MAX_SUM).to(x.dtype)
        return torch.clamp((pooled * valid).amax(dim=(2, 3), keepdim=True), min=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = torch.clamp(self.ref / self.brightest(x), *self.gain_range)
        return torch.clamp(x * gain, 0.0, 255.0)


class Deployable(nn.Module):
    """uint8 NHWC RGB in; optional cell crop, then optional background balance; normalised NCHW float to the network; logits or probabilities out."""

    def __init__(
        self, net: nn.Module, probabilities: bool = True, mean=STAIN_MEAN, std=STAIN_STD, crop: CellCrop | None = None,
        balance: BackgroundBalance | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.crop = crop
        self.balance = balance
        self.probabilities = probabilities
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        if self.crop is not None:
            x = self.crop(x)
        if self.balance is not None:
            x = self.balance(x)
        y = self.net(x * self.scale - self.shift)
        return torch.softmax(y, dim=1) if self.probabilities else y


def build_deployable(
    arch: str, num_classes: int, size: tuple[int, int], crop: tuple[int, int] | None, probabilities: bool = True, follow: bool = False,
    background: Sequence[float] | None = None,
) -> Deployable:
    """The network for a run's (decode size, cell crop, whether the window follows the nucleus, background colour), wrapped as exported: one rule for train and export."""
    net = build(arch, num_classes, net_input_size(size, crop))
    entry = archs.get(arch)
    return Deployable(
        net, probabilities=probabilities, mean=entry.mean, std=entry.std, crop=CellCrop(*crop, follow=follow) if crop else None,
        balance=BackgroundBalance(background) if background is not None else None,
    )
