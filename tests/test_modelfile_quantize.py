"""wbc_batch.modelfile.quantize: static INT8 with the float model's contract, from a file or from a model held in memory."""

from __future__ import annotations

import hashlib

import pytest
from conftest import SAMPLE, build_color_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from wbc_batch.inference.model import default_model_path, load_model, model_from_bytes  # noqa: E402
from wbc_batch.modelfile.proto import metadata_doc  # noqa: E402
from wbc_batch.modelfile.quantize import int8_path, quantize_model  # noqa: E402


def test_quantized_model_keeps_the_contract_and_records_how(tmp_path):
    src = build_color_model(tmp_path / "m.onnx")
    res = quantize_model(src, SAMPLE, n_calibration=32)
    assert res["output"] == str(int8_path(src)) == str(tmp_path / "m.int8.onnx")
    q = onnx.load(res["output"])
    doc = metadata_doc(q)
    assert q.ir_version == onnx.load(str(src)).ir_version
    assert doc["name"] == "color-test-int8" and doc["labels"] == metadata_doc(onnx.load(str(src)))["labels"]
    assert doc["quantization"]["calibration"] == {"dir": str(SAMPLE), "images": 32, "method": "percentile 99.99"}
    assert doc["quantization"]["float_model_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert load_model(res["output"]).labels == load_model(src).labels


def test_a_model_in_memory_quantises_as_its_file_does(tmp_path):
    src = build_color_model(tmp_path / "m.onnx")
    from_file = quantize_model(src, SAMPLE, output=tmp_path / "file.int8.onnx", n_calibration=32, eval_dir=SAMPLE)
    held = model_from_bytes(src.read_bytes(), tmp_path / "never-written.onnx")
    in_memory = quantize_model(held, SAMPLE, n_calibration=32, eval_dir=SAMPLE)
    assert in_memory["output"] == str(tmp_path / "never-written.int8.onnx") and not (tmp_path / "never-written.onnx").exists()
    a, b = onnx.load(from_file["output"]), onnx.load(in_memory["output"])
    assert a.graph.SerializeToString() == b.graph.SerializeToString() and metadata_doc(a) == metadata_doc(b)
    for key in ("calibration_images", "float_accuracy", "int8_accuracy", "float_macro_f1", "int8_macro_f1", "agreement"):
        assert in_memory[key] == from_file[key], key


def test_quantize_calibrates_on_images_decoded_as_the_model_decodes_them(tmp_path, monkeypatch):
    # The calibration decode dropped keep_aspect: a model that pads single-cell crops was calibrated on stretched ones.
    import wbc_batch.modelfile.images as images_mod

    seen = []

    def capture(paths, spec):
        seen.append(spec)
        raise RuntimeError("stop after the decode spec")

    monkeypatch.setattr(images_mod, "decode_sample", capture)
    with pytest.raises(RuntimeError, match="stop after"):
        quantize_model(default_model_path(), SAMPLE, output=tmp_path / "q.onnx", n_calibration=4)
    assert seen == [load_model(default_model_path()).metadata.preprocess] and seen[0].keep_aspect
