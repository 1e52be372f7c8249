"""Fit a model file's calibration and domain check from class folders, and write them into a new model file.

Used by ``wbc-batch calibrate`` (any exported wbc-batch model, the shipped one included, without
its run folder) and by export. Images are decoded by the classify path (the model's own
preprocessing), so the features fitted here are the features classify will see.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..evaluation.reliability import expected_calibration_error
from ..inference.discover import iter_images
from ..inference.metadata import METADATA_KEY, ModelMetadata
from ..inference.preprocess import ImageError, load_image
from .onnx_metadata import save_checked, set_metadata
from .trust import OOD_OUTPUT, GraphHead, add_trust_outputs, find_head, fit_reference, fit_temperature, with_probe_outputs

#: Share of held-out in-domain images that must pass the domain check (the threshold's quantile).
DEFAULT_IN_DOMAIN_QUANTILE = 0.995
BATCH = 64


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


def probe(model: onnx.ModelProto, head: GraphHead, md: ModelMetadata, paths: Sequence[str], threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and penultimate features of ``paths`` (undecodable files are an error: fitting data must be clean)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    sess = ort.InferenceSession(with_probe_outputs(model, head).SerializeToString(), so, providers=["CPUExecutionProvider"])
    spec = md.preprocess
    logits, feats = [], []
    for i in range(0, len(paths), BATCH):
        try:
            x = np.stack([load_image(p, spec) for p in paths[i : i + BATCH]])
        except ImageError as e:
            raise ValueError(f"cannot fit on an image that does not decode: {e}") from e
        lg, ft = sess.run([head.logits, head.features], {md.input_name: x})
        logits.append(lg)
        feats.append(ft.reshape(len(x), -1))
    return np.concatenate(logits), np.concatenate(feats)


def _softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    s = z / t - (z / t).max(1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(1, keepdims=True)


def _ece(logits: np.ndarray, labels: Sequence[int], t: float) -> float:
    p = _softmax(logits, t)
    return expected_calibration_error(p.max(1), p.argmax(1) == np.asarray(labels))


Folders = str | os.PathLike[str] | LabelledSet
NO_HELD_OUT = "no held-out labelled data was given (--calibration-dir)"


def calibrate_model(
    model_path: str | os.PathLike[str],
    reference_dir: Folders,
    output: str | os.PathLike[str],
    calibration_dir: Folders | None = None,
    quantile: float = DEFAULT_IN_DOMAIN_QUANTILE,
    *,
    why_uncalibrated: str = NO_HELD_OUT,
) -> dict:
    """Write ``output``: the model with calibrated probabilities and an ``ood_score`` output; returns the new metadata sections.

    ``reference_dir`` is the training data (class folders, or a :class:`LabelledSet`): its features
    define "in domain". ``calibration_dir`` is held-out labelled data from the same labs (never the
    test set): it fits the temperature and places the threshold. Without it the temperature stays 1
    and the threshold is the quantile of the reference scores, which runs low (the network has seen
    those images): the metadata says which was done, and why (``why_uncalibrated``).
    ``output`` may be ``model_path`` (the file is replaced atomically).
    """
    model = onnx.load_model(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    md = ModelMetadata.from_props(props)
    if md.domain is not None:
        raise ValueError(f"{model_path} already has a domain check ({md.domain.output!r}): calibrate the model it came from")
    head = find_head(model, md.output_name)
    ref = _as_set(reference_dir, md.labels)
    _, ref_feats = probe(model, head, md, ref.paths)
    reference = fit_reference(ref_feats, ref.labels, len(md.labels))
    sections = {"domain": _domain_section(ref, reference.scores(ref_feats), quantile)}
    temperature = 1.0
    if calibration_dir is not None:
        cal = _as_set(calibration_dir, md.labels)
        cal_logits, cal_feats = probe(model, head, md, cal.paths)
        temperature = fit_temperature(cal_logits, cal.labels)
        sections["domain"] = _domain_section(ref, reference.scores(cal_feats), quantile, held_out=cal)
        sections["calibration"] = _calibration_section(cal, cal_logits, temperature)
    else:
        sections["calibration"] = {"method": "none", "temperature": 1.0, "why": why_uncalibrated}
    out = add_trust_outputs(model, head, temperature, reference)
    doc = json.loads(props[METADATA_KEY])
    doc.update(sections)
    ModelMetadata.from_json_dict(doc)  # the new document must still read back
    set_metadata(out, doc)
    save_checked(out, output)  # add_trust_outputs ran the full check
    return sections


def _as_set(folders: Folders, labels: Sequence[str]) -> LabelledSet:
    return folders if isinstance(folders, LabelledSet) else labelled_set(folders, labels)


def run_split(run_dir: str | os.PathLike[str], labels: Sequence[str]) -> tuple[LabelledSet, LabelledSet | None, str]:
    """A training run's files as (training, validation, why): validation None (and ``why`` says why) when there is none to use.

    The split is the run's own: the groups its record names as held out (``val_sources``); every
    other file under its data folder is training data. A run on several data folders (each split by
    its own groups) gives all their files as training and no validation. Needs torch (the run record).
    """
    from .data import read_group_file, scan_class_folders
    from .record import RunRecord

    record = RunRecord.read(run_dir)
    cfg = record.config
    if not isinstance(cfg.data_dir, (str, os.PathLike)):  # several data folders
        dirs = [str(d) for d in cfg.data_dir]
        train = LabelledSet(root=", ".join(dirs))
        for d in dirs:
            part = labelled_set(d, labels)
            train.paths += part.paths
            train.labels += part.labels
        return train, None, "the run trained on several data folders, whose validation split is not rebuilt here, and no --calibration-dir was given"
    group_map = read_group_file(cfg.groups_file) if cfg.groups_file else None
    files = scan_class_folders(cfg.data_dir, cfg.group_regex, group_map)
    index = {lb.upper(): i for i, lb in enumerate(labels)}
    held_out = set(record.val_sources or []) if not record.val_is_train else set()
    train, val = LabelledSet(root=str(cfg.data_dir)), LabelledSet(root=f"{cfg.data_dir} (the run's validation split)")
    for path, target, group in zip(files.paths, files.targets, files.groups, strict=True):
        side = val if group in held_out else train
        side.paths.append(path)
        side.labels.append(index[files.classes[int(target)].upper()])
    why = "the run validated on its training data (too few groups to hold any out) and no --calibration-dir was given"
    return train, (val if val.paths else None), why


def calibrate_export(run_dir: str | os.PathLike[str], model_path: str | os.PathLike[str], calibration_dir: str | os.PathLike[str] | None = None) -> dict:
    """What ``wbc-batch export`` adds to the model it wrote: calibration and the domain check, fitted on the run's data.

    Reference: the run's training files. Temperature and threshold: ``calibration_dir``, else the
    run's validation split when it is a real held-out one, else none (temperature 1, threshold from
    the training files; the metadata says so).
    """
    md = ModelMetadata.from_props({p.key: p.value for p in onnx.load_model(str(model_path), load_external_data=False).metadata_props})
    train, val, why = run_split(run_dir, md.labels)
    held_out = calibration_dir if calibration_dir is not None else val
    return calibrate_model(model_path, train, model_path, calibration_dir=held_out, why_uncalibrated=why)


def _domain_section(ref: LabelledSet, scores: np.ndarray, quantile: float, held_out: LabelledSet | None = None) -> dict:
    threshold = float(np.quantile(scores, quantile))
    source = held_out or ref
    return {
        "method": "Mahalanobis distance (shared covariance) of the penultimate features to the nearest class mean, / feature dimension",
        "output": OOD_OUTPUT,
        "threshold": round(threshold, 6),
        "in_domain": f"{OOD_OUTPUT} <= threshold",
        "reference": {"path": ref.root, "files": len(ref.paths)},
        "threshold_from": {"path": source.root, "files": len(source.paths), "quantile": quantile,
                           "held_out": held_out is not None},
    }


def _calibration_section(cal: LabelledSet, logits: np.ndarray, temperature: float) -> dict:
    return {
        "method": "temperature",
        "temperature": round(temperature, 6),
        "applied": "inside the graph: probabilities = softmax(logits / temperature)",
        "data": {"path": cal.root, "files": len(cal.paths)},
        "ece_before": round(_ece(logits, cal.labels, 1.0), 4),
        "ece_after": round(_ece(logits, cal.labels, temperature), 4),
    }
