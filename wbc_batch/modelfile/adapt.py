"""``wbc-batch adapt``: fit a model to a lab's own images without labels, by re-measuring its batch-norm statistics.

Why: each convolution's output is normalised by statistics of the training images. Another lab's stain and camera
shift those statistics, and every later layer reads the shift as evidence (the shipped model calls most of a third
lab's neutrophils EOSINOPHIL). Re-measuring them on the lab's own images (AdaBN, Li et al. 2016; no labels needed)
removes that part of the shift; the weights are untouched.

The exporter folds each batch norm into the convolution before it, which loses the trained scale and shift; the
model's metadata keeps them (``batchnorm``: per folded convolution, ``mean`` = the trained shift, ``std`` = the
trained scale's size, ``eps``), so the refold is exact: with ``m, v`` the channel mean and variance of the folded
output ``y = W x + b`` on the lab's images, the adapted output is ``std * (y - m) / sqrt(v + eps) + mean``, i.e.
``W <- k W``, ``b <- k (b - m) + mean`` with ``k = std / sqrt(v + eps)``. Layers are measured in network order,
each on the output of the layers already adapted, as a batch norm in training mode would see them.

Needs onnx, not torch: a lab can adapt a model file it was given.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ..errors import ExitCode, WbcBatchError
from ..inference.discover import common_root, iter_images
from ..inference.metadata import ModelMetadata
from ..inference.preprocess import ImageError, load_image
from .proto import metadata_doc, save_checked, set_metadata

DEFAULT_MAX_IMAGES = 512  # enough for stable channel statistics (150 cells gave the figures in the model card)
BATCH = 64


class AdaptError(WbcBatchError):
    """The model cannot be adapted (no batch-norm record, weights not found), or there are no usable images."""

    exit_code = ExitCode.MODEL


@dataclass
class AdaptReport:
    output: str
    images: int  # decoded and used
    skipped: int  # unreadable files among those sampled
    layers: int
    seconds: float
    name: str  # the adapted model's, in its metadata


def sample_paths(inputs: Sequence[str | os.PathLike[str]], max_images: int) -> list[str]:
    """Up to ``max_images`` image files under ``inputs``, evenly spaced in path order (deterministic)."""
    paths = sorted(f.path for f in iter_images(inputs))
    if max_images and len(paths) > max_images:
        paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, max_images).round().astype(int))]
    return paths


def adapted_name(source: str, inputs: Sequence[str | os.PathLike[str]]) -> str:
    """The default name of an adapted model: ``SOURCE-adapted-FOLDER``, FOLDER the inputs' common folder.

    Why not the source's name: reports and sidecars name the model that wrote a CSV, and the source and
    its adaptations to several labs must not read as one model.
    """
    return f"{source}-adapted-{common_root(inputs).name or 'images'}"


def decode(paths: Sequence[str], md: ModelMetadata) -> tuple[np.ndarray, int]:
    """The images as the model decodes them (N, H, W, 3) uint8, and how many could not be read."""
    out, skipped = [], 0
    for p in paths:
        try:
            out.append(load_image(p, md.preprocess))
        except (ImageError, OSError):
            skipped += 1
    if not out:
        raise AdaptError(f"none of the {len(paths)} sampled files could be decoded as an image", exit_code=ExitCode.NO_IMAGES)
    return np.stack(out), skipped


def _initializers(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in g.initializer}


def _conv_output(g: onnx.GraphProto, weight: str) -> str:
    nodes = [n for n in g.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] == weight]
    if len(nodes) != 1:
        raise AdaptError(f"expected one Conv reading {weight!r}, found {len(nodes)}: not the graph the exporter wrote")
    return nodes[0].output[0]


def channel_stats(model: onnx.ModelProto, tensor: str, images: np.ndarray, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) variance of the NCHW ``tensor`` of ``model`` over ``images``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    s = ss = None
    n = 0
    for i in range(0, len(images), BATCH):
        y = sess.run([tensor], {name: images[i : i + BATCH]})[0].astype(np.float64)
        s = y.sum((0, 2, 3)) + (0 if s is None else s)
        ss = (y * y).sum((0, 2, 3)) + (0 if ss is None else ss)
        n += y.shape[0] * y.shape[2] * y.shape[3]
    mean = s / n
    return mean, np.maximum(ss / n - mean * mean, 0.0)


def refold(model: onnx.ModelProto, layer: dict, mean: np.ndarray, var: np.ndarray) -> dict:
    """Rewrite one folded convolution's weight and bias in place so its output has the trained statistics; returns the
    layer's record for the new fold. ``eps`` is the batch norm's epsilon in units of the folded output, so it scales by
    ``k^2`` with the fold: kept as it was, a second adapt would normalise by the wrong epsilon (on a depthwise
    convolution of efficientnet-lite0, 20% off its scale)."""
    inits = _initializers(model.graph)
    w_name, b_name = f"{layer['conv']}.weight", f"{layer['conv']}.weight_bias"
    w, b = numpy_helper.to_array(inits[w_name]), numpy_helper.to_array(inits[b_name])
    k = np.asarray(layer["std"]) / np.sqrt(var + np.asarray(layer["eps"]))
    new_w = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
    new_b = (k * (b - mean) + np.asarray(layer["mean"])).astype(b.dtype)
    inits[w_name].CopyFrom(numpy_helper.from_array(new_w, w_name))
    inits[b_name].CopyFrom(numpy_helper.from_array(new_b, b_name))
    return {**layer, "eps": (np.asarray(layer["eps"]) * k * k).tolist()}


def adapt_model(
    model_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    threads: int = 0,
    name: str | None = None,
) -> AdaptReport:
    """Write ``output``: ``model_path`` with every folded batch norm re-measured on the images under ``inputs``.

    ``name``: the adapted model's name in its metadata (default: :func:`adapted_name`).
    """
    t0 = time.perf_counter()
    data = Path(model_path).read_bytes()
    model = onnx.load_model_from_string(data)
    try:
        doc = metadata_doc(model)
    except KeyError:
        doc = {}
    layers = doc.get("batchnorm")
    if not layers:
        raise AdaptError(f"{model_path} carries no batch-norm record (metadata 'batchnorm'): export it again from its run "
                         "folder with this wbc-batch (INT8 models cannot be adapted: adapt the float model, then quantise)")
    missing = [f"{x['conv']}.weight" for x in layers if f"{x['conv']}.weight" not in _initializers(model.graph)]
    if missing:
        raise AdaptError(f"{model_path}: weights {missing[:2]} not found in the graph (quantised or edited by hand?)")
    md = ModelMetadata.from_json_dict(doc)
    paths = sample_paths(inputs, max_images)
    if not paths:
        raise AdaptError(f"no image files under {', '.join(map(str, inputs))}", exit_code=ExitCode.NO_IMAGES)
    images, skipped = decode(paths, md)
    refolded = []
    for layer in layers:
        mean, var = channel_stats(model, _conv_output(model.graph, f"{layer['conv']}.weight"), images, threads)
        refolded.append(refold(model, layer, mean, var))
    doc["batchnorm"] = refolded
    doc["adapted"] = {"images": len(images), "skipped": skipped, "layers": len(layers), "max_images": max_images,
                      "source": {"name": md.name, "sha256": hashlib.sha256(data).hexdigest()},
                      "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    doc["name"] = name or adapted_name(md.name, inputs)
    ModelMetadata.from_json_dict(doc)  # still reads back
    set_metadata(model, doc)
    save_checked(model, output)
    return AdaptReport(str(output), len(images), skipped, len(layers), time.perf_counter() - t0, doc["name"])
