"""Static INT8 (QDQ) quantisation with onnxruntime's tools, calibrated on real images.

The INT8 model keeps the float model's contract (uint8 NHWC in, probabilities out, same
metadata, plus a ``quantization`` record), so classify uses it unchanged. Whether it is
worth shipping is measured here: accuracy and argmax agreement with the float model on a
labelled set, and network-only speed for both on the same cores.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..inference.model import Model, load_model, model_from_bytes, network_rate
from . import images
from .proto import metadata_doc, save_checked, set_metadata

CALIBRATION_METHOD = "percentile 99.99"


class _Reader:
    """onnxruntime CalibrationDataReader over pre-decoded uint8 batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 16) -> None:
        # Equal-sized batches only: the percentile calibrator stacks them.
        n = max(1, len(images) // batch) * batch if len(images) >= batch else len(images)
        self.batches = iter([{input_name: images[i : i + batch]} for i in range(0, n, batch)])

    def get_next(self):
        return next(self.batches, None)


def int8_path(float_path: str | os.PathLike[str]) -> Path:
    """Where the INT8 model of ``float_path`` goes by default: ``<float>.int8.onnx`` beside it."""
    p = Path(float_path)
    return p.with_name(p.stem + ".int8.onnx")


def quantize_model(
    float_model: str | os.PathLike[str] | Model,
    calibration_dir: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    eval_dir: str | os.PathLike[str] | None = None,
    n_calibration: int = 512,
    seed: int = 0,
) -> dict:
    """Write the INT8 model (default: :func:`int8_path`) and return its accuracy, agreement and speed next to the float model's.

    ``float_model``: a model file, or a :class:`Model` held in memory (export quantises the model it has
    just built from its bytes, not from the file).
    """
    fm = float_model if isinstance(float_model, Model) else load_model(float_model, threads=1)
    proto = onnx.load_model_from_string(fm.data)
    out = Path(output) if output else int8_path(fm.path)
    calib = images.decode_sample(images.random_sample(calibration_dir, n_calibration, seed), fm.metadata.preprocess)
    record = {
        "format": "QDQ static",
        "weights": "int8 per-channel",
        "activations": "uint8",
        "calibration": {"dir": str(calibration_dir), "images": int(len(calib)), "method": CALIBRATION_METHOD},
        "float_model_sha256": fm.sha256,
    }
    doc = metadata_doc(proto)
    q = _quantized(fm.data, fm.metadata.input_name, calib)
    q.ir_version = proto.ir_version  # the quantiser raises it; the float model's keeps the file loadable where that one is
    set_metadata(q, {**doc, "name": doc.get("name", "model") + "-int8", "quantization": record})
    save_checked(q, out)
    qm = model_from_bytes(q.SerializeToString(), out)
    result: dict = {"output": str(out), "calibration_images": int(len(calib)), **_speeds(fm, qm, calib)}
    if eval_dir:
        result.update(_accuracies(fm, qm, eval_dir))
    return result


def _quantized(float_bytes: bytes, input_name: str, calib: np.ndarray) -> onnx.ModelProto:
    """onnxruntime's static QDQ quantisation of the float model (its tools take files: a scratch folder holds them)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as td:
        src, pre, q = Path(td) / "float.onnx", Path(td) / "pre.onnx", Path(td) / "int8.onnx"
        src.write_bytes(float_bytes)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(q),
            _Reader(input_name, calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": 99.99},
        )
        return onnx.load(str(q))


def _speeds(fm: Model, qm: Model, calib: np.ndarray) -> dict:
    """Network-only images/s of both models on the same decoded images, each session with onnxruntime's default threads."""
    bench = calib[: min(len(calib), 512)]
    f = round(network_rate(model_from_bytes(fm.data, fm.path), bench, repeat=3), 1)  # fm's own session has one thread
    q = round(network_rate(qm, bench, repeat=3), 1)
    return {"float_images_per_s": f, "int8_images_per_s": q, "speedup": round(q / f, 3)}


def _accuracies(fm: Model, qm: Model, eval_dir: str | os.PathLike[str]) -> dict:
    """Both models' figures on a labelled set, and how often they agree; one classify pass per model serves both."""
    from ..evaluation.evaluate import metrics_of
    from ..inference.orchestrator import classify

    pf, pq = list(classify([eval_dir], fm)), list(classify([eval_dir], qm))
    mf, mq = metrics_of(pf, fm.labels, eval_dir), metrics_of(pq, fm.labels, eval_dir)
    agreement = float(np.mean([a.label == b.label for a, b in zip(pf, pq, strict=True)])) if pf else 0.0
    return {"float_accuracy": mf["accuracy"], "int8_accuracy": mq["accuracy"], "float_macro_f1": mf["macro_f1"],
            "int8_macro_f1": mq["macro_f1"], "agreement": agreement}
