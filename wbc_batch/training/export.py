"""Run dir -> one self-describing ONNX file, checked against PyTorch, built in memory and written once.

The graph takes uint8 RGB NHWC with a dynamic batch axis and returns probabilities; the
labels and preprocessing travel in the metadata (:mod:`wbc_batch.inference.metadata`). Opset and IR
version are pinned so that the file loads on every onnxruntime the project supports
(1.23.2 is the newest on Python 3.10). :func:`export_model` is the whole export: graph, calibration
and domain check (:mod:`wbc_batch.modelfile.calibrate`), metrics, one atomic write, then INT8 from the
model in memory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..inference.metadata import ModelMetadata

if TYPE_CHECKING:
    import onnx

    from ..modelfile.calibrate import LabelledSet

OPSET = 18
IR_VERSION = 9  # onnxruntime >= 1.16 reads it
PARITY_ATOL = 1e-4  # max |onnxruntime - torch| on probabilities


@dataclass
class ExportReport:
    output: str
    opset: int
    ir_version: int
    parity_images: int
    max_abs_diff_batch1: float
    max_abs_diff_odd_batch: float
    max_abs_diff_all: float
    argmax_agreement: float
    tolerance: float = PARITY_ATOL
    eval_metrics: dict | None = None
    notes: list[str] = field(default_factory=list)


def data_fingerprint(data_dir: str | os.PathLike[str], classes: Sequence[str] | None = None) -> dict:
    """A cheap identity of a class-folder data set: sha256 over (relative path, size) of the files training reads.

    ``classes``: the class folders the run trained on (default: all). A folder with more classes than the
    model's (pbc/train has 8, a model 4 of them) must not count the others as training data.
    """
    from .data import scan_class_folders

    root = Path(data_dir)
    try:
        scan = scan_class_folders(root)
    except (FileNotFoundError, ValueError):  # moved or reshaped since training: name it only
        return {"path": str(root)}
    keep = set(scan.classes if classes is None else classes)
    paths = [p for p, t in zip(scan.paths, scan.targets, strict=True) if scan.classes[t] in keep]
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).relative_to(root).as_posix()}\0{os.path.getsize(p)}\n".encode())
    return {"path": str(root), "files": len(paths), "sha256_names_sizes": h.hexdigest()}


def _fingerprints(dirs: Sequence[str], classes: Sequence[str]) -> dict | list[dict]:
    """One data folder's fingerprint as before; several: one per folder, in training order."""
    prints = [data_fingerprint(d, classes) for d in dirs]
    return prints[0] if len(prints) == 1 else prints


def load_run(run_dir: str | os.PathLike[str], checkpoint: str = "best.pt"):
    """The trained network of a run dir (eval mode, wrapped to take uint8 NHWC), its record, and the weights' epoch.

    The weights are read with ``torch.load(weights_only=True)``: a run folder cannot run code.
    """
    from .models import build_deployable
    from .record import RunRecord, load_weights

    record = RunRecord.read(run_dir)
    model = build_deployable(record.config.arch, len(record.classes), record.size, record.crop, follow=record.config.crop_follow,
                             background=record.background)
    model.net.load_state_dict(load_weights(Path(run_dir) / checkpoint))
    return model.eval(), record, record.epoch_of(checkpoint)


def _to_onnx_bytes(model, h: int, w: int) -> bytes:
    import onnx
    import torch

    x = torch.zeros((3, h, w, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    prog = torch.onnx.export(
        model,
        (x,),
        input_names=["image"],
        output_names=["probabilities"],
        opset_version=OPSET,
        dynamo=True,
        dynamic_shapes=({0: batch},),
        optimize=True,
        verbose=False,
    )
    proto = prog.model_proto
    proto.ir_version = IR_VERSION
    # Keep only the default domain's opset import at our pinned version (no onnxscript domains needed).
    opsets = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    buf = io.BytesIO()
    onnx.save_model(proto, buf)
    return buf.getvalue()


def check_parity(model, data: bytes, images: np.ndarray, output: str | os.PathLike[str], tolerance: float = PARITY_ATOL) -> ExportReport:
    """onnxruntime vs torch probabilities at batch 1, an odd batch (7) and all ``images``; raises on a mismatch.

    ``tolerance``: the architecture's (see :attr:`.archs.Arch.parity_atol`): a deep network's own float32 rounding sets it."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = model(torch.from_numpy(images)).numpy()
    got1 = np.concatenate([sess.run(None, {"image": images[i : i + 1]})[0] for i in range(min(16, len(images)))])
    got7 = sess.run(None, {"image": images[:7]})[0]
    got_all = np.concatenate([sess.run(None, {"image": images[i : i + 64]})[0] for i in range(0, len(images), 64)])
    d1 = float(np.abs(got1 - ref[: len(got1)]).max())
    d7 = float(np.abs(got7 - ref[:7]).max())
    dall = float(np.abs(got_all - ref).max())
    agree = float((got_all.argmax(1) == ref.argmax(1)).mean())
    report = ExportReport(str(output), OPSET, IR_VERSION, len(images), d1, d7, dall, agree, tolerance)
    if max(d1, d7, dall) > tolerance or agree < 1.0:
        raise RuntimeError(f"ONNX/torch parity failed: {json.dumps(asdict(report))}")
    return report


#: TrainConfig fields recorded in the model's metadata (``training.config``).
_RECORDED = ("size", "crop", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "label_smoothing", "augment", "val_fraction", "group_regex", "groups_file", "seed", "class_weights",
             "class_subset", "keep_aspect", "crop_follow", "colour", "jpeg", "colour_norm", "precise_bn", "source_balance", "pretrained")


def model_metadata(record, epoch: int | None, report: ExportReport, name: str) -> ModelMetadata:
    """What the ONNX file says about itself: contract (labels, input, preprocessing) and provenance."""
    import onnx
    import onnxruntime as ort
    import torch

    from .. import __version__

    spec = record.spec
    cfg = record.to_dict()
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime_export_check": ort.__version__}
    training = {
        "data": _fingerprints(record.config.data_dirs(), record.classes),
        **({"sources": record.sources} if record.sources else {}),
        "epoch": epoch,
        # "crop": [window, out] of the in-graph cell crop ([0, 0]: whole field); informative only.
        "config": {k: cfg[k] for k in _RECORDED if k in cfg},
        "n_train": record.n_train,
        "n_val": record.n_val,
        **({"init": record.init} if record.init else {}),
    }
    return ModelMetadata(
        labels=tuple(record.classes), height=spec.height, width=spec.width, resize=spec.resize, jpeg_draft=spec.jpeg_draft,
        max_pixels=spec.max_pixels, keep_aspect=spec.keep_aspect, name=name, arch=record.config.arch,
        extra={
            "training": training,
            "metrics": report.eval_metrics or {},
            "normalisation": normalisation(record.config.arch),
            "export_parity": {k: v for k, v in asdict(report).items() if k.startswith(("max_abs", "argmax", "parity", "tolerance"))},
            "versions": {**versions, "wbc_batch": __version__, "python": sys.version.split()[0]},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )


def normalisation(arch: str) -> dict:
    """The per-channel mean and std (RGB, 0..1) the graph normalises with: informative, the graph applies them itself."""
    from .archs import get

    a = get(arch)
    return {"mean": [round(v, 6) for v in a.mean], "std": [round(v, 6) for v in a.std]}


def batchnorm_record(net) -> list[dict]:
    """Per batch norm the exporter folds into the convolution before it, what the fold loses: the trained shift
    (``mean``), the size of the trained scale (``std``) and ``eps`` as seen from the folded output. ``wbc-batch adapt``
    needs them to re-measure the statistics on a lab's own images (see :mod:`.adapt`)."""
    import torch

    from .init_weights import conv_bn_pairs

    out = []
    with torch.no_grad():
        for conv, bn in conv_bn_pairs(net):
            m = net.get_submodule(bn)
            a = m.weight / torch.sqrt(m.running_var + m.eps)  # the folded scale
            out.append({"conv": f"net.{conv}", **{k: [float(f"{x:.8g}") for x in v.double().tolist()]
                                                   for k, v in (("mean", m.bias), ("std", m.weight.abs()), ("eps", a * a * m.eps))}})
    return out


def export_proto(
    run_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    checkpoint: str = "best.pt",
    name: str | None = None,
    check_dir: str | os.PathLike[str] | None = None,
    check_images: int = 256,
    eval_metrics: dict | None = None,
) -> tuple[onnx.ModelProto, ExportReport]:
    """The network of ``run_dir`` as an ONNX proto with its metadata, checked against PyTorch; nothing is written.

    Checks: onnxruntime vs torch probabilities within the architecture's tolerance (:data:`PARITY_ATOL`
    unless its registry entry says otherwise) at batch 1, an odd batch (7) and the whole sample; argmax
    agreement 100% on real images (from ``check_dir``, default: the run's training data); ``onnx.checker``
    full check. ``output`` names the file to be (the default model name is its stem). Returns (proto, report).
    """
    import onnx

    from ..modelfile import images as sample
    from ..modelfile.proto import set_metadata
    from .archs import get as get_arch

    model, record, epoch = load_run(run_dir, checkpoint)
    h, w = record.size
    data = _to_onnx_bytes(model, h, w)
    check_src = check_dir or record.config.data_dirs()[0]
    images = (sample.decode_sample(sample.random_sample(check_src, check_images), record.spec) if check_src and Path(check_src).is_dir()
              else np.zeros((0, h, w, 3), np.uint8))
    if len(images) < 8:
        raise RuntimeError(f"export parity needs real images: found {len(images)} under {check_src!r} (give --check-dir)")
    report = check_parity(model, data, images, output, get_arch(record.config.arch).parity_atol)
    report.eval_metrics = eval_metrics
    md = model_metadata(record, epoch, report, name or Path(output).stem)
    md.extra["batchnorm"] = batchnorm_record(model.net)
    proto = onnx.load_model_from_string(data)
    set_metadata(proto, md.to_json_dict())
    proto.doc_string = f"wbc-batch {md.arch}: white blood cell classifier; labels and preprocessing in metadata key 'wbc_batch'"
    onnx.checker.check_model(proto, full_check=True)
    return proto, report


def export_run(run_dir: str | os.PathLike[str], output: str | os.PathLike[str], **kw) -> ExportReport:
    """Write the network of ``run_dir`` alone (:func:`export_proto`, no calibration or domain check) to ``output``.

    Nothing is written when a check fails. The export command writes :func:`export_model`'s file instead.
    """
    from ..modelfile.proto import save_checked

    proto, report = export_proto(run_dir, output, **kw)
    save_checked(proto, output)
    return report


def run_split(run_dir: str | os.PathLike[str], labels: Sequence[str]) -> tuple[LabelledSet, LabelledSet | None, str]:
    """A training run's files as (training, validation, why): validation None (and ``why`` says why) when there is none to use.

    The split is the run's own, rebuilt by the scan that made it (one folder or several, the class
    subset, the groups): files whose group the record names as held out (``val_sources``) are
    validation; every other file under its data folders is training data.
    """
    from ..modelfile.calibrate import LabelledSet
    from .data import read_group_file, scan_sources
    from .record import RunRecord

    record = RunRecord.read(run_dir)
    cfg = record.config
    dirs = cfg.data_dirs()
    group_map = read_group_file(cfg.groups_file) if cfg.groups_file else None
    files = scan_sources(dirs, cfg.group_regex, group_map, cfg.class_subset)
    index = {lb.upper(): i for i, lb in enumerate(labels)}
    held_out = set(record.val_sources or []) if not record.val_is_train else set()
    root = ", ".join(dirs)
    train, val = LabelledSet(root=root), LabelledSet(root=f"{root} (the run's validation split)")
    for path, target, group in zip(files.paths, files.targets, files.groups, strict=True):
        side = val if group in held_out else train
        side.paths.append(path)
        side.labels.append(index[files.classes[int(target)].upper()])
    why = "the run validated on its training data (too few groups to hold any out) and no --calibration-dir was given"
    return train, (val if val.paths else None), why


def calibrate_run(
    run_dir: str | os.PathLike[str], proto: onnx.ModelProto, calibration_dir: str | os.PathLike[str] | None = None, temperature: str = "fit"
) -> tuple[onnx.ModelProto, dict]:
    """What export adds to the model it built: calibration and the domain check, fitted on the run's data; returns (proto, sections).

    Reference: the run's training files. Temperature and threshold: ``calibration_dir``, else the
    run's validation split when it is a real held-out one, else none (temperature 1, threshold from
    the training files; the metadata says so).
    """
    from ..inference.model import read_metadata
    from ..modelfile.calibrate import calibrate_proto

    train, val, why = run_split(run_dir, read_metadata(proto).labels)
    held_out = calibration_dir if calibration_dir is not None else val
    return calibrate_proto(proto, train, calibration_dir=held_out, why_uncalibrated=why, temperature=temperature)


#: The evaluation figures kept in a model's metadata (the per-file predictions are not).
_EMBEDDED = ("eval_dir", "n", "accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "errors")


def embed_metrics(proto: onnx.ModelProto, metrics: dict, key: str = "metrics") -> None:
    """Store evaluation figures in the model's metadata, in place (the graph is unchanged)."""
    from ..modelfile.proto import metadata_doc, set_metadata

    set_metadata(proto, {**metadata_doc(proto), key: {k: metrics[k] for k in _EMBEDDED if k in metrics}})


@dataclass(frozen=True)
class ExportOptions:
    """What ``wbc-batch export`` takes besides the run folder and the output (its options, one field each)."""

    checkpoint: str = "best.pt"
    name: str | None = None
    check_dir: str | os.PathLike[str] | None = None
    check_images: int = 256
    eval_dir: str | os.PathLike[str] | None = None
    int8_dir: str | os.PathLike[str] | None = None
    calibration_dir: str | os.PathLike[str] | None = None
    temperature: str = "fit"


def export_model(run_dir: str | os.PathLike[str], output: str | os.PathLike[str], options: ExportOptions = ExportOptions()) -> dict:
    """The whole export: graph and metadata, calibration and domain check, evaluation figures, built in memory and
    written to ``output`` once, atomically; then the INT8 model, quantised from the model in memory.

    Returns each step's figures: ``parity``, ``trust``, and with their options ``eval`` and ``int8``.
    Nothing is written when a step before the write fails.
    """
    from ..evaluation.evaluate import metrics_of
    from ..inference.model import model_from_bytes
    from ..inference.orchestrator import classify
    from ..modelfile.proto import save_checked

    proto, report = export_proto(run_dir, output, checkpoint=options.checkpoint, name=options.name, check_dir=options.check_dir,
                                 check_images=options.check_images)
    proto, trust = calibrate_run(run_dir, proto, options.calibration_dir, options.temperature)
    out: dict = {"parity": asdict(report), "trust": trust}
    if options.eval_dir:
        scored = model_from_bytes(proto.SerializeToString(), output, threads=1)  # classify's workers build their sessions from its bytes
        out["eval"] = metrics_of(list(classify([options.eval_dir], scored)), scored.labels, options.eval_dir)
        embed_metrics(proto, out["eval"])
    save_checked(proto, output)  # export_proto and add_trust_outputs ran the full check
    if options.int8_dir:
        from ..modelfile.quantize import quantize_model

        out["int8"] = quantize_model(model_from_bytes(proto.SerializeToString(), output, threads=1), options.int8_dir, eval_dir=options.eval_dir)
    return out
