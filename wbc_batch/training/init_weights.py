"""``train --init``: start from a trained run folder's weights or from an exported wbc-batch ONNX model.

From ONNX the weights are the graph's initializers, named by the exporter after the torch
parameters (``net.features.1.0.weight``). The exporter folds each batch norm into the
convolution before it (``<conv>.weight`` scaled, plus a ``<conv>.weight_bias``); those batch
norms are rebuilt as an exact identity whose statistics are measured on the new training
images, so the network computes what the ONNX file computes and trains from there.
When the class set differs the classifier is rebuilt: rows of classes both sets share are
kept, new classes start fresh. Anything that does not map is an error that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExitCode, WbcBatchError
from .models import Deployable


class InitError(WbcBatchError, ValueError):
    """The --init source cannot seed this network: the message says what does not map."""

    exit_code = ExitCode.MODEL


@dataclass
class InitSource:
    path: str
    kind: str  # "run" | "onnx"
    arch: str
    classes: tuple[str, ...]
    state: dict[str, torch.Tensor]
    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, batch norm) pairs folded by the exporter
    background: list[float] | None = None  # the background colour its inputs were balanced to (colour_norm background), else None
    crop: tuple[int, int] | None = None  # (window, out) it was trained with, (0, 0): the whole field; None: not recorded


def conv_bn_pairs(net: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where a BatchNorm2d directly follows a Conv2d."""
    mods = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    return [(a, b) for (a, ma), (b, mb) in zip(mods, mods[1:], strict=False) if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d)]


def classifier_name(net: nn.Module) -> str:
    """The last Linear layer: the one whose rows are the classes."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InitError(f"{type(net).__name__} has no Linear classifier to rebuild")
    return names[-1]


def _from_run(path: Path) -> InitSource:
    from .record import BEST_WEIGHTS, RunRecord, load_weights

    rec = RunRecord.read(path)
    crop = tuple(rec.config.crop) if rec.config.crop is not None else None
    return InitSource(str(path), "run", rec.config.arch, tuple(rec.classes), load_weights(path / BEST_WEIGHTS), background=rec.background,
                      crop=crop)


def _from_onnx(path: Path) -> InitSource:
    import onnx
    from onnx import numpy_helper

    from ..inference.metadata import ModelMetadata
    from ..modelfile.proto import metadata_doc

    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: whatever the bytes are, they are no model
        raise InitError(f"--init {path}: not an ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    try:
        doc = metadata_doc(proto)
    except KeyError:
        raise InitError(f"{path}: not a wbc-batch model (no 'wbc_batch' metadata)") from None
    labels = ModelMetadata.from_json_dict(doc).labels  # checked as classify checks them: a string is not four classes
    state = {i.name[len("net."):]: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer if i.name.startswith("net.")}
    if not state:
        raise InitError(f"{path}: no initializer is named after a network parameter ('net.*'); was it exported by wbc-batch?")
    ref = [numpy_helper.to_array(i).reshape(-1).tolist() for i in proto.graph.initializer if i.name == "balance.ref"]
    crop = doc.get("training", {}).get("config", {}).get("crop")
    return InitSource(str(path), "onnx", doc.get("arch", ""), labels, state, background=[round(float(v), 2) for v in ref[0]] if ref else None,
                      crop=tuple(crop) if crop is not None else None)


def read_init(path: str | os.PathLike[str]) -> InitSource:
    """A run folder (``config.json`` + ``best.pt``) or a ``.onnx`` file exported by wbc-batch."""
    p = Path(path)
    if p.is_dir():
        return _from_run(p)
    if p.suffix.lower() == ".onnx":
        return _from_onnx(p)
    raise InitError(f"--init {path}: expected a run folder or an exported .onnx model")


def _unfold(src: InitSource, net: nn.Module) -> dict[str, torch.Tensor]:
    """Source state with every exporter-folded batch norm written back as an identity (statistics set later)."""
    state = dict(src.state)
    for conv, bn in conv_bn_pairs(net):
        bias = state.pop(f"{conv}.weight_bias", None)
        if bias is None or f"{bn}.weight" in state:
            continue
        eps = net.get_submodule(bn).eps
        state.update({f"{bn}.weight": torch.ones_like(bias), f"{bn}.bias": bias, f"{bn}.running_mean": torch.zeros_like(bias),
                      f"{bn}.running_var": torch.full_like(bias, 1.0 - eps), f"{bn}.num_batches_tracked": torch.tensor(0)})
        src.folded.append((conv, bn))
    return state


def _rebuild_head(state: dict, target: dict, head: str, src_classes: tuple[str, ...], classes: tuple[str, ...]) -> list[str]:
    """Classifier rows of the shared classes copied into the fresh head; returns the classes kept."""
    kept = [c for c in classes if c in src_classes]
    for key in (f"{head}.weight", f"{head}.bias"):
        if key not in state:
            raise InitError(f"the --init weights have no {key}")
        new = target[key].clone()
        if new.shape[1:] != state[key].shape[1:]:
            raise InitError(f"{key}: shape {tuple(state[key].shape)} in --init, {tuple(new.shape)} here")
        for c in kept:
            new[classes.index(c)] = state[key][src_classes.index(c)]
        state[key] = new
    return kept


def _measure_folded(model: Deployable, pairs: list[tuple[str, str]], images: np.ndarray, device: torch.device, n: int = 512) -> None:
    """Give each rebuilt batch norm the statistics of its convolution's output on ``images``, keeping it exact.

    With running mean m, variance v, weight sqrt(v + eps) and bias m + b, eval mode still computes
    ``conv(x) + b`` (the ONNX graph); training mode then normalises by batch statistics close to m, v.
    """
    net = model.net
    sums: dict[str, list[torch.Tensor]] = {conv: [] for conv, _ in pairs}

    def hook(name: str):
        return lambda _m, _i, out: sums[name].append(torch.stack([out.double().sum((0, 2, 3)), (out.double() ** 2).sum((0, 2, 3)),
                                                                     torch.full_like(out[0, :, 0, 0], out[:, 0].numel(), dtype=torch.float64)]))

    handles = [net.get_submodule(conv).register_forward_hook(hook(conv)) for conv, _ in pairs]
    idx = np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).astype(int))
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(idx), 64):
                model(torch.from_numpy(images[idx[i : i + 64]]).to(device))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for conv, bn in pairs:
            s, ss, cnt = torch.stack(sums[conv]).sum(0)
            mean, var = s / cnt, (ss / cnt - (s / cnt) ** 2).clamp_min(0)
            m = net.get_submodule(bn)
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.bias.copy_(mean + m.bias.double())
            m.weight.copy_(torch.sqrt(var + m.eps))


def init_model(model: Deployable, src: InitSource, arch: str, classes: tuple[str, ...], images: np.ndarray, device: torch.device) -> dict:
    """Load ``src`` into ``model.net`` (head rebuilt if the class set differs); returns what was done, for the record."""
    if src.arch and src.arch != arch:
        raise InitError(f"--init {src.path} is a {src.arch} network; this run trains {arch} (give --arch {src.arch})")
    net = model.net
    target = net.state_dict()
    state = _unfold(src, net)
    same = tuple(src.classes) == tuple(classes)
    kept = list(classes) if same else _rebuild_head(state, target, classifier_name(net), src.classes, classes)
    problems = [f"{k}: missing" for k in target if k not in state]
    problems += [f"{k}: shape {tuple(state[k].shape)} in --init, {tuple(v.shape)} here" for k, v in target.items() if k in state and state[k].shape != v.shape]
    problems += [f"{k}: not a parameter of {arch}" for k in state if k not in target]
    if problems:
        raise InitError(f"--init {src.path}: {len(problems)} weights do not map onto this {arch}: " + "; ".join(problems[:6]))
    net.load_state_dict({k: state[k].to(target[k].dtype) for k in target})
    if src.folded:
        _measure_folded(model, src.folded, images, device)
    return {"from": src.path, "kind": src.kind, "classes": list(src.classes), "kept": kept,
            "new": [c for c in classes if c not in kept], "rebuilt_batch_norms": len(src.folded)}
