"""Fit a model's calibration and domain check from class folders, and write them into the model.

Used by ``wbc-batch calibrate`` (any exported wbc-batch model, the shipped one included, without
its run folder) and by export, on the model it holds in memory. Images are decoded by the classify
path (the model's own preprocessing), so the features fitted here are the features classify will see.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ..evaluation.reliability import expected_calibration_error
from ..inference.discover import iter_images
from ..inference.metadata import ModelMetadata
from ..inference.model import read_metadata
from ..inference.preprocess import ImageError, load_image
from .proto import metadata_doc, save_checked, set_metadata
from .trust import (
    NUCLEUS_MARGIN,
    OOD_OUTPUT,
    PROBE_NUCLEUS,
    TEMPERATURE,
    DomainFit,
    GraphHead,
    add_trust_outputs,
    block_outputs,
    find_head,
    fit_domain_check,
    fit_temperature,
    nucleus_threshold,
    strip_trust_outputs,
    with_probe_outputs,
)

#: Share of held-out in-domain images that must pass the domain check (the threshold's quantile).
DEFAULT_IN_DOMAIN_QUANTILE = 0.995
BATCH = 64
#: A temperature is fitted only on held-out data with at least this many misclassified images (see _calibration).
MIN_CALIBRATION_ERRORS = 10
#: Below this many held-out images a fitted temperature is called a rough estimate (metadata ``sample``, console):
#: ECE over 15 bins, and so the rule that keeps a temperature only when it lowers ECE, moves with a handful of images.
MIN_FIT_IMAGES = 200


@dataclass
class LabelledSet:
    """Images under class folders whose names match the model's labels (case-insensitive)."""

    root: str
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped_classes: list[str] = field(default_factory=list)


def labelled_set(root: str | os.PathLike[str], labels: Sequence[str]) -> LabelledSet:
    index = {lb.upper(): i for i, lb in enumerate(labels)}
    out = LabelledSet(root=str(root))
    for f in iter_images([root], Path(root)):
        top = f.rel.split("/")[0].upper() if "/" in f.rel else ""
        if top in index:
            out.paths.append(str(f.path))
            out.labels.append(index[top])
        elif top and top not in out.skipped_classes:
            out.skipped_classes.append(top)
    if not out.paths:
        raise ValueError(f"{root}: no image under a folder named after one of the model's labels {list(labels)}")
    return out


@dataclass
class Probe:
    """What the fit reads from each image: logits, penultimate features, nucleus signal, each stage output's channel means."""

    logits: np.ndarray
    features: np.ndarray
    nucleus: np.ndarray
    blocks: list[np.ndarray] = field(default_factory=list)

    def layers(self) -> list[np.ndarray]:
        """The domain check's layers, in its order: the blocks, then the penultimate features."""
        return [*self.blocks, self.features]


def probe(model: onnx.ModelProto, head: GraphHead, md: ModelMetadata, paths: Sequence[str], blocks: Sequence[str] = (), threads: int = 0) -> Probe:
    """Logits, penultimate features, nucleus signal and ``blocks``' channel means of ``paths`` (undecodable files are an error: fitting data must be clean)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    sess = ort.InferenceSession(with_probe_outputs(model, head, blocks).SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [head.logits, head.features, PROBE_NUCLEUS, *(f"probe_block{i}" for i in range(len(blocks)))]
    out: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, len(paths), BATCH):
        try:
            x = np.stack([load_image(p, md.preprocess) for p in paths[i : i + BATCH]])
        except ImageError as e:
            raise ValueError(f"cannot fit on an image that does not decode: {e}") from e
        for acc, v in zip(out, sess.run(names, {md.input_name: x}), strict=True):
            acc.append(v.reshape(len(x), -1) if v.ndim > 1 else v)
    logits, feats, nuc, *blks = (np.concatenate(v) for v in out)
    return Probe(logits, feats, nuc, blks)


def _softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    s = z / t - (z / t).max(1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(1, keepdims=True)


def _ece(logits: np.ndarray, labels: Sequence[int], t: float) -> float:
    p = _softmax(logits, t)
    return expected_calibration_error(p.max(1), p.argmax(1) == np.asarray(labels))


Folders = str | os.PathLike[str] | LabelledSet
NO_HELD_OUT = "no held-out labelled data was given (--calibration-dir)"
NOT_FITTED = ("--temperature none: the held-out data is not like the images the model will meet, so a temperature fitted on it"
              " (held_out: what it would be) is left out")


def calibrate_proto(
    model: onnx.ModelProto,
    reference: Folders,
    calibration_dir: Folders | None = None,
    quantile: float = DEFAULT_IN_DOMAIN_QUANTILE,
    *,
    why_uncalibrated: str = NO_HELD_OUT,
    temperature: str = "fit",
) -> tuple[onnx.ModelProto, dict]:
    """``model`` with calibrated probabilities and an ``ood_score`` output, and the new metadata sections; nothing is written.

    ``reference`` is the training data (class folders, or a :class:`LabelledSet`): its features
    define "in domain". ``calibration_dir`` is held-out labelled data from the same labs (never the
    test set): it fits the temperature and places the threshold. Without it the temperature stays 1
    and the threshold is the quantile of the reference scores, which runs low (the network has seen
    those images): the metadata says which was done, and why (``why_uncalibrated``).
    ``temperature``: ``fit`` (on the held-out data) or ``none`` (keep 1, e.g. when the held-out data
    is not like the images the model will meet: copies of training fields, one easy lab); the domain
    threshold is still placed on the held-out data.
    A model that already carries a temperature or a domain check (every export does) is fitted anew
    from its bare network; the returned ``replaced`` (not written into the model) says what it carried.
    """
    if temperature not in ("fit", "none"):
        raise ValueError(f"unknown temperature {temperature!r}; choose fit or none")
    md = read_metadata(model)
    bare, replaced = _bare(model, md)
    head = find_head(bare, md.output_name)
    blocks = block_outputs(bare)
    ref = _as_set(reference, md.labels)
    seen = probe(bare, head, md, ref.paths, blocks)
    held, cal = seen, None
    if calibration_dir is not None:
        cal = _as_set(calibration_dir, md.labels)
        held = probe(bare, head, md, cal.paths, blocks)
    check = fit_domain_check((*blocks, head.features), seen.layers(), ref.labels, len(md.labels), held.layers(), quantile)
    domain = _domain_section(ref, check, check.scores(held.layers()), held.nucleus, quantile, held_out=cal)
    t, calibration = _calibration(cal, held.logits, temperature, why_uncalibrated)
    sections = {"domain": domain, "calibration": calibration}
    out = add_trust_outputs(bare, head, t, check, (domain["threshold"], domain["nucleus"]["threshold"]))
    doc = {**metadata_doc(model), **sections}
    ModelMetadata.from_json_dict(doc)  # the new document must still read back
    set_metadata(out, doc)
    return out, ({**sections, "replaced": replaced} if replaced else sections)


def calibrate_model(
    model_path: str | os.PathLike[str],
    reference_dir: Folders,
    output: str | os.PathLike[str],
    calibration_dir: Folders | None = None,
    quantile: float = DEFAULT_IN_DOMAIN_QUANTILE,
    *,
    why_uncalibrated: str = NO_HELD_OUT,
    temperature: str = "fit",
) -> dict:
    """Write ``output``: the model file ``model_path`` as :func:`calibrate_proto` makes it; returns the new metadata sections.

    ``output`` may be ``model_path`` (the file is replaced atomically).
    """
    out, sections = calibrate_proto(onnx.load_model(str(model_path)), reference_dir, calibration_dir, quantile,
                                    why_uncalibrated=why_uncalibrated, temperature=temperature)
    save_checked(out, output)  # add_trust_outputs ran the full check
    return sections


def _bare(model: onnx.ModelProto, md: ModelMetadata) -> tuple[onnx.ModelProto, dict | None]:
    """The network without the temperature and domain check it carries, and what they were (None: it carried neither)."""
    temperature = next((float(numpy_helper.to_array(i)) for i in model.graph.initializer if i.name == TEMPERATURE), None)
    if md.domain is None and temperature is None:
        return model, None
    bare = strip_trust_outputs(model, md.output_name, (md.domain.output,) if md.domain else ())
    domain = None if md.domain is None else {"output": md.domain.output, "threshold": md.domain.threshold}
    return bare, {"temperature": 1.0 if temperature is None else temperature, "domain": domain}


def _calibration(cal: LabelledSet | None, logits: np.ndarray, temperature: str, why_uncalibrated: str) -> tuple[float, dict]:
    """(temperature, metadata section): fitted on the held-out images when asked, identifiable and an improvement, else 1 and why.

    Why the error count: the held-out NLL falls as T shrinks while every image is right, so a set
    with (almost) no errors drives T to the search bound and every probability to 1; a few
    hundred cells of a lab's own, 95% right, hold too few errors to place it.
    Why the ECE test: T minimises the NLL, not the calibration error; when a few confident errors
    dominate the NLL, the T that pays for them leaves the right images underconfident and the
    held-out ECE higher than with no temperature (measured: 0.136 -> 0.188 on 44 images). Such a T
    is not applied; the fit stays on record under ``held_out``.
    """
    none = {"method": "none", "temperature": 1.0}
    if cal is None:
        return 1.0, {**none, "why": why_uncalibrated}
    t = fit_temperature(logits, cal.labels)
    fitted = _calibration_section(cal, logits, t)
    errors = int((np.asarray(logits).argmax(1) != np.asarray(cal.labels)).sum())
    if temperature == "none":
        return 1.0, {**none, "why": NOT_FITTED, "held_out": fitted}
    if errors < MIN_CALIBRATION_ERRORS:
        why = (f"too few held-out errors to fit a temperature ({errors} in {len(cal.paths)} images; it takes "
               f"{MIN_CALIBRATION_ERRORS}): give more held-out images with --calibration-dir")
        return 1.0, {**none, "why": why, "held_out": fitted}
    before, after = _ece(logits, cal.labels, 1.0), _ece(logits, cal.labels, t)
    if after >= before:
        why = (f"the temperature that fits the held-out images best ({t:.3f}) makes their calibration worse (ECE {before:.3f} -> "
               f"{after:.3f} on {len(cal.paths)} held-out images), so it is not applied: temperature 1")
        note = temperature_note(len(cal.paths), errors)
        return 1.0, {**none, "why": f"{why}; {note}" if note else why, "held_out": fitted}
    return fitted["temperature"], fitted


def temperature_note(n: int, errors: int) -> str | None:
    """What to say of a temperature fitted on ``n`` held-out images, ``errors`` of them wrong: None when they are enough."""
    if n >= MIN_FIT_IMAGES:
        return None
    return (f"few images: a temperature fitted on {n} held-out images ({errors} wrong) is a rough estimate; "
            f"{MIN_FIT_IMAGES} or more (--calibration-dir) place it")


def quantile_note(n: int, quantile: float) -> str | None:
    """What to say of a ``quantile`` of ``n`` scores (the domain threshold): None when it is a quantile, not their maximum.

    numpy's (linear) quantile lies between the two largest of n scores while (n - 1) * q > n - 2,
    that is n <= 1 / (1 - q): 200 for 0.995. The nucleus rule's 1 - q quantile is then, alike, all
    but the smallest signal.
    """
    if quantile >= 1.0 or n > round(1 / (1 - quantile)):
        return None
    return (f"few images: a {quantile:g} quantile of {n} scores lies between their two largest (it is all but their maximum, "
            f"as the nucleus rule's {1 - quantile:.3g} quantile is all but their minimum); it takes more than "
            f"{round(1 / (1 - quantile))} held-out images (--calibration-dir) to place it")


def trust_lines(sections: dict) -> list[str]:
    """The console lines of a fit (export and calibrate print the same): the temperature, the domain threshold, the sample size."""
    cal, dom = sections["calibration"], sections["domain"]
    src = dom["threshold_from"]
    if cal["method"] == "temperature":
        line = (f"calibration: temperature {cal['temperature']:.3f} fitted on {cal['data']['files']} held-out images "
                f"(ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f})" + (f"; {cal['sample']}" if "sample" in cal else ""))
    else:
        line = f"calibration: temperature {cal['temperature']:.3f} (none: {cal.get('why', 'no held-out data')})"
    lines = [line, f"domain check: in domain when ood_score <= {dom['threshold']:.3f} ({src['quantile']:g} quantile of {src['files']} "
                   f"{'held-out' if src['held_out'] else 'reference'} images; reference {dom['reference']['files']} images)"
                   + (f"; {src['sample']}" if "sample" in src else "")]
    old = sections.get("replaced")
    if old:
        dom = old["domain"]
        lines.insert(0, f"replaced what the model carried (temperature {old['temperature']:.3f}"
                        + (f"; in domain when {dom['output']} <= {dom['threshold']:.3f}" if dom else "") + "): fitted anew on its bare network")
    return lines


def _as_set(folders: Folders, labels: Sequence[str]) -> LabelledSet:
    return folders if isinstance(folders, LabelledSet) else labelled_set(folders, labels)


def _domain_section(
    ref: LabelledSet, check: DomainFit, scores: np.ndarray, nucleus: np.ndarray, quantile: float, held_out: LabelledSet | None = None
) -> dict:
    threshold = float(np.quantile(scores, quantile))
    source = held_out or ref
    return {
        "method": "per layer (each resolution stage's channel means, the penultimate features): Mahalanobis distance (shared covariance)"
                  " to the nearest class mean / feature dimension / the layer's scale; the largest over layers;"
                  " raised for an image without a nucleus: max(that, threshold * nucleus.threshold / nucleus signal)",
        "output": OOD_OUTPUT,
        "threshold": round(threshold, 6),
        "layers": [{"tensor": t, "features": int(r.whitening.shape[0]), "scale": round(s, 6)}
                   for t, r, s in zip(check.layers, check.references, check.scales, strict=True)],
        "in_domain": f"{OOD_OUTPUT} <= threshold",
        "reference": {"path": ref.root, "files": len(ref.paths)},
        "threshold_from": {"path": source.root, "files": len(source.paths), "quantile": quantile,
                           "held_out": held_out is not None, **_said("sample", quantile_note(len(source.paths), quantile))},
        "nucleus": {
            "signal": "max minus mean over 36x36-pixel means (9x9 smoothed) of B - R - G/2 + 127.5 on 4x4-pixel block means, blocks with R+G+B <= 60 as 0"
                      " (a nucleus-following crop's own map: there each block is weighted by its share of such pixels)",
            "threshold": round(nucleus_threshold(nucleus, quantile), 4),
            "rule": f"{NUCLEUS_MARGIN} x the {1 - quantile:.3g} quantile of the threshold_from images' signal",
        },
    }


def _calibration_section(cal: LabelledSet, logits: np.ndarray, temperature: float) -> dict:
    return {
        "method": "temperature",
        "temperature": round(temperature, 6),
        "applied": "inside the graph: probabilities = softmax(logits / temperature)",
        "data": {"path": cal.root, "files": len(cal.paths)},
        "ece_before": round(_ece(logits, cal.labels, 1.0), 4),
        "ece_after": round(_ece(logits, cal.labels, temperature), 4),
        **_said("sample", temperature_note(len(cal.paths), int((np.asarray(logits).argmax(1) != np.asarray(cal.labels)).sum()))),
    }


def _said(key: str, note: str | None) -> dict:
    """``{key: note}``, or nothing when there is nothing to say (older readers never see an empty key)."""
    return {} if note is None else {key: note}
