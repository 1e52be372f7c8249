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

from ..inference.model import load_model, network_rate


class _Reader:
    """onnxruntime CalibrationDataReader over pre-decoded uint8 batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 16) -> None:
        # Equal-sized batches only: the percentile calibrator stacks them.
        n = max(1, len(images) // batch) * batch if len(images) >= batch else len(images)
        self.batches = iter([{input_name: images[i : i + batch]} for i in range(0, n, batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_model(
    float_path: str | os.PathLike[str],
    calibration_dir: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    eval_dir: str | os.PathLike[str] | None = None,
    n_calibration: int = 512,
    seed: int = 0,
) -> dict:
    """Write ``<float>.int8.onnx`` and return its accuracy, agreement and speed next to the float model's."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..evaluation.evaluate import metrics_of, predict_dir
    from .export import _sample_images, parity_paths
    from .onnx_metadata import read_metadata, rewrite_metadata

    float_path = Path(float_path)
    out = Path(output) if output else float_path.with_name(float_path.stem + ".int8.onnx")
    fm = load_model(float_path, threads=1)
    md = fm.metadata
    spec = md.preprocess  # the model's own decode (keep_aspect included), as classify feeds it
    calib = _sample_images(parity_paths(calibration_dir, n_calibration, seed), spec)
    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Reader(md.input_name, calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": 99.99},
        )
    # Same contract and provenance as the float model, plus how it was quantised.
    float_proto = onnx.load(str(float_path))
    record = {
        "format": "QDQ static",
        "weights": "int8 per-channel",
        "activations": "uint8",
        "calibration": {"dir": str(calibration_dir), "images": int(len(calib)), "method": "percentile 99.99"},
        "float_model_sha256": fm.sha256,
    }
    doc = read_metadata(float_proto)
    doc = {**doc, "name": doc.get("name", "model") + "-int8", "quantization": record}
    rewrite_metadata(out, lambda _: doc, ir_version=float_proto.ir_version)

    result: dict = {"output": str(out), "calibration_images": int(len(calib))}
    bench = calib[: min(len(calib), 512)]
    result["float_images_per_s"] = round(network_rate(load_model(float_path), bench, repeat=3), 1)
    result["int8_images_per_s"] = round(network_rate(load_model(out), bench, repeat=3), 1)
    result["speedup"] = round(result["int8_images_per_s"] / result["float_images_per_s"], 3)
    if eval_dir:
        # One classify pass per model serves both its metrics and the agreement.
        labels, pf = predict_dir(float_path, eval_dir)
        _, pq = predict_dir(out, eval_dir)
        mf, mq = metrics_of(pf, labels, eval_dir), metrics_of(pq, labels, eval_dir)
        result.update(float_accuracy=mf["accuracy"], int8_accuracy=mq["accuracy"], float_macro_f1=mf["macro_f1"], int8_macro_f1=mq["macro_f1"])
        result["agreement"] = float(np.mean([a.label == b.label for a, b in zip(pf, pq, strict=True)])) if pf else 0.0
    return result

