"""Calibrated probabilities and an out-of-domain score, fitted from data and written into the ONNX graph.

Why in the graph: every consumer (Python, C#, Java, C++, JavaScript) then gets the calibrated
probabilities and the domain score from one ``session.run``, with nothing to re-implement. Works on
any wbc-batch model whose probabilities come from ``Softmax(Gemm(features))`` (both architectures
the exporter writes), so a shipped model can be upgraded without its run folder.

* Calibration: temperature scaling (Guo et al. 2017): one scalar ``T`` that minimises the negative
  log-likelihood of held-out labels; ``probabilities = softmax(logits / T)``. It keeps the argmax,
  so labels and accuracy never change.
* Domain check: class-conditional Gaussians with a shared covariance (Lee et al. 2018, "Mahalanobis"),
  one per feature layer: each resolution stage's output (pooled to its channel means) and the
  penultimate features, fitted on the reference (training) images. A layer's score is the squared Mahalanobis
  distance to its nearest class mean divided by its dimension, over its ``scale`` (that layer's high
  held-out quantile); ``ood_score`` is the largest of them (their feature ensemble, layers weighted
  alike: there is no out-of-domain data to fit weights on). Why several layers: a network trained
  to ignore stain colour has penultimate features that hardly see it, so another lab's stain passed a
  check on those alone; the early blocks still carry colour and texture (measured: a third lab's
  cells 65% flagged on the penultimate features, 98% with the stages added). ``in_domain`` is
  ``ood_score <= threshold``, the threshold a high quantile of held-out in-domain scores.
* Nucleus check: features of an image without a white cell (red cells only, an empty field) can
  sit close to the training data, so the score is raised when the image holds no nucleus-like
  stain: ``nucleus_signal`` is how far the strongest 36x36-pixel mean of ``B - R - G/2 + 127.5``
  (the cell finder's own signal, on 4x4-pixel block means; near-black blocks, R+G+B <= 60 such as
  padding, count 0; a model with a nucleus-following crop reads the crop's own map, see
  :func:`crop_stain_map`) stands above the image's mean of it, so a
  flat colour or a blank field scores 0 whatever its colour; and ``ood_score = max(mahalanobis,
  threshold * nucleus_threshold / nucleus_signal)``; ``nucleus_threshold`` is
  :data:`NUCLEUS_MARGIN` times a low quantile of held-out in-domain images' signal. Images with a
  nucleus keep their Mahalanobis score exactly.

Needs onnx (train or test extra), not torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OOD_OUTPUT = "ood_score"
#: The initializer holding T; the Div that reads it is how :func:`strip_trust_outputs` finds the temperature.
TEMPERATURE = "calibration_temperature"
PROBE_NUCLEUS = "probe_nucleus_signal"
#: Ridge added to the covariance, relative to its mean eigenvalue: keeps the whitening finite when
#: some feature directions barely vary (ReLU features often have near-constant units).
COV_RIDGE = 1e-3
#: The nucleus threshold is this share of the held-out images' low-quantile signal: an image must
#: hold a nucleus standing out at least 0.7 times as far as the faintest in-domain ones do (measured
#: medians: a typical field 115, red cells only 13-27, blank or flat fields 0; see the model card).
NUCLEUS_MARGIN = 0.7
NUCLEUS_STRIDE, NUCLEUS_BLUR = 4, 9


@dataclass(frozen=True)
class GraphHead:
    """The tensors temperature scaling and the domain check hook into."""

    softmax: onnx.NodeProto
    logits: str
    features: str
    n_features: int


@dataclass(frozen=True)
class DomainReference:
    """Whitened class means of the reference features; the score is the distance to the nearest."""

    whitening: np.ndarray  # [D, D], symmetric inverse square root of the shared covariance
    means: np.ndarray  # [C, D], class means already multiplied by ``whitening``

    def scores(self, features: np.ndarray) -> np.ndarray:
        z = np.asarray(features, dtype=np.float64) @ self.whitening
        d2 = ((z[:, None, :] - self.means[None]) ** 2).sum(-1)
        return d2.min(1) / z.shape[1]


@dataclass(frozen=True)
class DomainFit:
    """The domain check as fitted, before it is written into the graph: one reference per feature layer; the score
    is the largest layer score over that layer's scale.

    What a model file then says of its check (output name and threshold) is
    :class:`wbc_batch.inference.metadata.DomainCheck`."""

    layers: tuple[str, ...]  # graph tensors: stage outputs (pooled to channel means in the graph), or the penultimate features
    references: tuple[DomainReference, ...]
    scales: tuple[float, ...]  # per layer: its held-out quantile, so score / scale <= 1 for that share of in-domain images

    def scores(self, per_layer: Sequence[np.ndarray]) -> np.ndarray:
        return np.max(np.stack([r.scores(f) / s for r, f, s in zip(self.references, per_layer, self.scales, strict=True)]), axis=0)


def fit_domain_check(
    layers: Sequence[str], reference: Sequence[np.ndarray], labels: Sequence[int], n_classes: int, held_out: Sequence[np.ndarray], quantile: float
) -> DomainFit:
    """Each layer's reference from the reference features, its scale the ``quantile`` of its held-out scores."""
    refs = tuple(fit_reference(f, labels, n_classes) for f in reference)
    scales = tuple(float(np.quantile(r.scores(h), quantile)) for r, h in zip(refs, held_out, strict=True))
    return DomainFit(tuple(layers), refs, scales)


def block_outputs(model: onnx.ModelProto) -> list[str]:
    """Each resolution stage's output: a convolution's activation (Relu, or Clip as ReLU6 exports) feeding a downsampling
    op (a strided Conv or a MaxPool).

    One layer per scale, as a feature pyramid takes them; the last stage is pooled into the penultimate
    features, a layer already. Measured on the shipped network: these three catch what all seven conv
    blocks do (a third lab's cells 98.7% vs 99.7% flagged) at half the cost (each pooled map is a pass
    over a feature map in another memory layout). In an inverted-residual network (EfficientNet-Lite) the
    activation feeding a strided depthwise convolution is the expanded view of the stage before it.
    The activation must read a Conv: a clamp elsewhere in the graph (the background balance) is no stage.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def downsamples(n: onnx.NodeProto) -> bool:
        strides = next((list(a.ints) for a in n.attribute if a.name == "strides"), [1])
        return n.op_type == "MaxPool" or (n.op_type == "Conv" and max(strides) > 1)

    def conv_activation(n: onnx.NodeProto) -> bool:
        src = producers.get(n.input[0]) if n.input else None
        return n.op_type in ("Relu", "Clip") and src is not None and src.op_type == "Conv"

    return [n.output[0] for n in model.graph.node if conv_activation(n) and any(downsamples(c) for c in consumers.get(n.output[0], []))]


def find_head(model: onnx.ModelProto, output_name: str) -> GraphHead:
    """Locate ``Softmax(Gemm(features))`` feeding ``output_name``; fail loudly for any other graph shape."""
    producers = {o: n for n in model.graph.node for o in n.output}
    softmax = producers.get(output_name)
    if softmax is None or softmax.op_type != "Softmax":
        raise ValueError(f"the model's output {output_name!r} is not produced by a Softmax; cannot add calibration or a domain check")
    gemm = producers.get(softmax.input[0])
    if gemm is None or gemm.op_type != "Gemm":
        raise ValueError(f"the logits {softmax.input[0]!r} do not come from a Gemm (fully connected) layer")
    inits = {i.name: i for i in model.graph.initializer}
    weight = inits.get(gemm.input[1])
    if weight is None:
        raise ValueError("the classifier weights are not a constant initializer")
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    n_features = int(weight.dims[1] if trans_b else weight.dims[0])
    return GraphHead(softmax=softmax, logits=softmax.input[0], features=gemm.input[0], n_features=n_features)


def with_probe_outputs(model: onnx.ModelProto, head: GraphHead, blocks: Sequence[str] = ()) -> onnx.ModelProto:
    """A copy that also outputs the logits, the penultimate features, the nucleus signal and the channel means of
    each of ``blocks`` (as ``probe_block{i}``) (for fitting; never shipped)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    nodes, inits = nucleus_nodes(g.input[0].name, PROBE_NUCLEUS, prefix="probe_nucleus", nchw=float_nchw(g), smooth=crop_stain_map(g))
    for i, b in enumerate(blocks):
        nodes += _pooled(b, f"probe_block{i}")
    probe.graph.node.extend(nodes)
    probe.graph.initializer.extend(inits)
    for name in (head.logits, head.features, PROBE_NUCLEUS, *(f"probe_block{i}" for i in range(len(blocks)))):
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return probe


def _pooled(tensor: str, out: str) -> list[onnx.NodeProto]:
    """``out`` [N, C] = the channel means of the NCHW ``tensor``."""
    return [helper.make_node("GlobalAveragePool", [tensor], [f"{out}_gap"], name=f"{out}_gap"),
            helper.make_node("Flatten", [f"{out}_gap"], [out], name=out)]


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The ``T`` minimising held-out NLL, by golden-section search on log T (the NLL is convex in 1/T)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y]))

    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi, b = b, a
            a = hi - g * (hi - lo)
        else:
            lo, a = a, b
            b = lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def fit_reference(features: np.ndarray, labels: Sequence[int], n_classes: int) -> DomainReference:
    """Class means and the shared (tied) covariance of the reference features, whitened once.

    A class the reference holds no image of gets no centre: the score is the distance to the nearest centre, so its cells
    are measured against the classes that were seen. Why not an error: a lab fine-tuning on the cells it reviewed
    (``train --labels corrections.csv --init MODEL``) keeps every class of the model, and may have reviewed none of one.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    present = [c for c in range(n_classes) if np.any(y == c)]
    if not present:
        raise ValueError("the reference data holds no image")
    means = np.stack([f[y == c].mean(0) for c in present])
    row = np.full(n_classes, -1)
    row[present] = np.arange(len(present))  # a class's row in means
    resid = f - means[row[y]]
    cov = resid.T @ resid / len(f)
    cov += np.eye(len(cov)) * COV_RIDGE * np.trace(cov) / len(cov)
    w, v = np.linalg.eigh(cov)
    whitening = (v * w**-0.5) @ v.T
    return DomainReference(whitening=whitening, means=means @ whitening)


def nucleus_nodes(
    image: str, out: str, prefix: str = "nucleus", nchw: str | None = None, smooth: str | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``out`` [N] = the nucleus signal of the uint8 NHWC RGB ``image`` (one builder: the graph and the fit both use it).

    ``nchw``: the graph's own float NCHW copy of ``image``, when it has one (see :func:`float_nchw`), read instead of a second cast.
    ``smooth``: the cell crop's own smoothed stain map, when it has one (see :func:`crop_stain_map`): the same map up to
    how padding is masked (per pixel there, per block here), so only its peak and mean are left to take.
    """
    nodes, inits = ([], []) if smooth is not None else _stain_map_nodes(image, prefix, nchw)
    smooth = smooth or f"{prefix}_smooth"
    axes = numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), f"{prefix}_axes")
    nodes += [
        helper.make_node("ReduceMax", [smooth, axes.name], [f"{prefix}_peak"], keepdims=0, name=f"{prefix}_peak"),
        helper.make_node("ReduceMean", [smooth, axes.name], [f"{prefix}_level"], keepdims=0, name=f"{prefix}_level"),
        helper.make_node("Sub", [f"{prefix}_peak", f"{prefix}_level"], [out], name=f"{prefix}_signal"),
    ]
    return nodes, [*inits, axes]


def _stain_map_nodes(image: str, prefix: str, nchw: str | None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``{prefix}_smooth``: the 9x9-smoothed map of ``B - R - G/2 + 127.5`` on 4x4 block means, dark blocks 0."""
    consts = {
        f"{prefix}_weights": np.array([-1.0, -0.5, 1.0], dtype=np.float32).reshape(1, 3, 1, 1),
        f"{prefix}_offset": np.array([127.5], dtype=np.float32),
        f"{prefix}_ones": np.ones((1, 3, 1, 1), dtype=np.float32),
        f"{prefix}_dark": np.array(60.0, dtype=np.float32),  # models.PADDING_MAX_SUM, the cell crop's rule (torch-free here)
    }
    n = lambda op, ins, outs, **kw: helper.make_node(op, [f"{prefix}_{i}" if i not in (image, nchw) else i for i in ins], [f"{prefix}_{o}" for o in outs], name=f"{prefix}_{outs[0]}", **kw)  # noqa: E731
    # Pool first (4x4 block means), then everything on 1/16 of the pixels: the full-resolution
    # version cost as much as the network's convolutions (measured: 1.9 ms of 5.2 ms per image).
    head = [n("Cast", [image], ["x"], to=TensorProto.FLOAT), n("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2])] if nchw is None else []
    nodes = [
        *head,
        n("AveragePool", [nchw or "nchw"], ["blocks"], kernel_shape=[NUCLEUS_STRIDE] * 2, strides=[NUCLEUS_STRIDE] * 2),
        n("Conv", ["blocks", "weights", "offset"], ["stain"]),
        n("Conv", ["blocks", "ones"], ["sum"]),
        n("Greater", ["sum", "dark"], ["lit"]),
        n("Cast", ["lit"], ["litf"], to=TensorProto.FLOAT),
        n("Mul", ["stain", "litf"], ["pooled"]),
        n("AveragePool", ["pooled"], ["smooth"], kernel_shape=[NUCLEUS_BLUR] * 2, strides=[1, 1], pads=[NUCLEUS_BLUR // 2] * 4, count_include_pad=0),
    ]
    return nodes, [numpy_helper.from_array(v, k) for k, v in consts.items()]


def nucleus_model(opset: int = 18) -> onnx.ModelProto:
    """A standalone graph: uint8 NHWC ``image`` -> ``nucleus_signal`` [N], the signal alone (the fit reads it through :func:`with_probe_outputs`)."""
    nodes, inits = nucleus_nodes("image", "nucleus_signal")
    graph = helper.make_graph(nodes, "nucleus_signal", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])],
                              [helper.make_tensor_value_info("nucleus_signal", TensorProto.FLOAT, ["N"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)  # IR 9: onnxruntime 1.16+ (1.23.2 on Python 3.10)


def nucleus_threshold(signals: np.ndarray, quantile: float) -> float:
    """:data:`NUCLEUS_MARGIN` times the ``1 - quantile`` quantile of held-out in-domain signals."""
    return float(NUCLEUS_MARGIN * np.quantile(np.asarray(signals, dtype=np.float64), 1.0 - quantile))


def add_trust_outputs(
    model: onnx.ModelProto, head: GraphHead, temperature: float, domain: DomainFit | None,
    nucleus: tuple[float, float] | None = None,
) -> onnx.ModelProto:
    """The model with ``probabilities = softmax(logits / T)`` and, given a domain check, an ``ood_score`` [N] output.

    ``nucleus``: (ood threshold, nucleus threshold): the score is raised for images without a nucleus (module doc).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    scaled = f"{head.logits}_over_temperature"
    g.initializer.append(numpy_helper.from_array(np.array(temperature, dtype=np.float32), TEMPERATURE))
    # The Div goes right before the Softmax it feeds, so the nodes stay in the dependency order ONNX requires.
    at = next(i for i, n in enumerate(g.node) if list(n.output) == list(head.softmax.output))
    g.node.insert(at, helper.make_node("Div", [head.logits, TEMPERATURE], [scaled], name="calibration_div"))
    g.node[at + 1].input[0] = scaled
    if domain is not None:
        # after everything: it reads the features, made earlier; with the nucleus term its score is one input of the final max
        _append_domain_score(g, head, domain, out="domain_mahalanobis" if nucleus is not None else OOD_OUTPUT)
        if nucleus is not None:
            _append_nucleus_term(g, *nucleus)
        g.output.append(helper.make_tensor_value_info(OOD_OUTPUT, TensorProto.FLOAT, ["N"]))
    onnx.checker.check_model(out, full_check=True)
    return out


def strip_trust_outputs(model: onnx.ModelProto, output_name: str, drop: Sequence[str] = (OOD_OUTPUT,)) -> onnx.ModelProto:
    """The model without what :func:`add_trust_outputs` added: the bare network, ready to be fitted anew.

    Why: every export and both shipped models already carry a check, and refitting it (other
    reference or held-out images) must start from the network's own logits. The temperature's Div
    is bypassed, the ``drop`` outputs removed, and every node and initializer that no output still
    needs goes with them: found by what the outputs need, not by name, so checks written by older
    versions (one layer, no nucleus term) strip alike.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producers = {o: n for n in g.node for o in n.output}
    softmax = producers.get(output_name)
    div = producers.get(softmax.input[0]) if softmax is not None and softmax.input else None
    if div is not None and div.op_type == "Div" and list(div.input)[1:] == [TEMPERATURE]:
        softmax.input[0] = div.input[0]
    kept_outputs = [o for o in g.output if o.name not in drop]
    del g.output[:]
    g.output.extend(kept_outputs)
    needed = {o.name for o in g.output}
    nodes = []
    for n in reversed(g.node):  # ONNX keeps nodes in dependency order: walking back, a node's consumers come first
        if needed & set(n.output):
            nodes.append(n)
            needed |= _reads(n)
    del g.node[:]
    g.node.extend(reversed(nodes))
    made = {o for n in g.node for o in n.output}
    for name, kept in (("initializer", [i for i in g.initializer if i.name in needed]),
                       ("value_info", [v for v in g.value_info if v.name in made])):
        field = getattr(g, name)
        del field[:]
        field.extend(kept)
    return out


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors ``node`` reads, those its subgraphs (If, Loop, Scan) read from the outer graph included."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in sub.node:
                names |= _reads(n)
    return names


def crop_stain_map(g: onnx.GraphProto) -> str | None:
    """The smoothed stain map of a nucleus-following cell crop (models.CellCrop, follow=True), or None.

    It is the graph's 9x9, stride-1 AveragePool over a product (the score times its validity mask); a
    fixed-window crop smooths the bare score (another signal), and the nodes this module adds are skipped.
    Reading it saves the domain check two passes over the full-size image (about 5% of the model's time).
    """
    producers = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type != "AveragePool" or n.name.startswith(("nucleus", "probe_nucleus")):
            continue
        ints = {a.name: list(a.ints) for a in n.attribute if a.ints}
        pad = next((a.i for a in n.attribute if a.name == "count_include_pad"), 0)
        src = producers.get(n.input[0])
        if ints.get("kernel_shape") == [NUCLEUS_BLUR] * 2 and ints.get("strides") == [1, 1] and not pad and src is not None and src.op_type == "Mul":
            return n.output[0]
    return None


def float_nchw(g: onnx.GraphProto) -> str | None:
    """The tensor ``Cast(Transpose(image, NCHW), float)`` a wbc-batch graph starts with, or None."""
    image = g.input[0].name
    for t in (n for n in g.node if n.op_type == "Transpose" and list(n.input) == [image]):
        if [a.ints for a in t.attribute if a.name == "perm"] == [[0, 3, 1, 2]]:
            for c in (n for n in g.node if n.op_type == "Cast" and list(n.input) == list(t.output)):
                if [a.i for a in c.attribute if a.name == "to"] == [TensorProto.FLOAT]:
                    return c.output[0]
    return None


def _append_nucleus_term(g: onnx.GraphProto, threshold: float, nucleus_threshold: float) -> None:
    """ood_score = max(mahalanobis, threshold * nucleus_threshold / max(nucleus_signal, 1))."""
    nodes, inits = nucleus_nodes(g.input[0].name, "nucleus_signal", nchw=float_nchw(g), smooth=crop_stain_map(g))
    g.initializer.extend(inits)
    g.initializer.extend([numpy_helper.from_array(np.array(threshold * nucleus_threshold, dtype=np.float32), "nucleus_scale"),
                          numpy_helper.from_array(np.array(1.0, dtype=np.float32), "nucleus_floor")])
    g.node.extend(nodes)
    g.node.extend([
        helper.make_node("Max", ["nucleus_signal", "nucleus_floor"], ["nucleus_safe"], name="nucleus_safe"),
        helper.make_node("Div", ["nucleus_scale", "nucleus_safe"], ["nucleus_term"], name="nucleus_term"),
        helper.make_node("Max", ["domain_mahalanobis", "nucleus_term"], [OOD_OUTPUT], name="domain_score_with_nucleus"),
    ])


def _append_domain_score(g: onnx.GraphProto, head: GraphHead, check: DomainFit, out: str = OOD_OUTPUT) -> None:
    """``out`` = max over layers l of min_c ||f_l @ W_l - mu_c W_l||^2 / (D_l * scale_l), in plain opset-18 ops."""
    g.initializer.extend([numpy_helper.from_array(np.array([1], dtype=np.int64), "domain_axis1"),
                          numpy_helper.from_array(np.array([2], dtype=np.int64), "domain_axis2")])
    scores = []
    for i, (layer, ref, scale) in enumerate(zip(check.layers, check.references, check.scales, strict=True)):
        p = f"domain{i}"
        src = layer if layer == head.features else f"{p}_features"
        if layer != head.features:
            g.node.extend(_pooled(layer, src))
        g.initializer.extend([numpy_helper.from_array(ref.whitening.astype(np.float32), f"{p}_whitening"),
                              numpy_helper.from_array(ref.means.astype(np.float32), f"{p}_means"),
                              numpy_helper.from_array(np.array(ref.whitening.shape[0] * scale, dtype=np.float32), f"{p}_norm")])
        g.node.extend([
            helper.make_node("MatMul", [src, f"{p}_whitening"], [f"{p}_z"], name=f"{p}_whiten"),
            helper.make_node("Unsqueeze", [f"{p}_z", "domain_axis1"], [f"{p}_z3"], name=f"{p}_unsqueeze"),
            helper.make_node("Sub", [f"{p}_z3", f"{p}_means"], [f"{p}_diff"], name=f"{p}_diff"),
            helper.make_node("ReduceSumSquare", [f"{p}_diff", "domain_axis2"], [f"{p}_d2"], keepdims=0, name=f"{p}_d2"),
            helper.make_node("ReduceMin", [f"{p}_d2", "domain_axis1"], [f"{p}_min"], keepdims=0, name=f"{p}_min"),
            helper.make_node("Div", [f"{p}_min", f"{p}_norm"], [f"{p}_score"], name=f"{p}_score"),
        ])
        scores.append(f"{p}_score")
    g.node.append(helper.make_node("Max", scores, [out], name="domain_score"))
