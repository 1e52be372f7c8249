"""The one metadata-rewrite path (export, metric embedding, quantisation): onnx only, no torch."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, build_color_model

onnx = pytest.importorskip("onnx")

from wbc_batch.inference.metadata import METADATA_KEY  # noqa: E402
from wbc_batch.inference.model import load_model  # noqa: E402
from wbc_batch.training.export import embed_metrics  # noqa: E402
from wbc_batch.training.onnx_metadata import read_metadata, rewrite_metadata  # noqa: E402


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_rewrite_edits_only_the_wbc_batch_document(tmp_path):
    path = build_color_model(tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="other", value="kept")
    onnx.save(proto, str(path))
    graph_before = proto.graph.SerializeToString()

    rewrite_metadata(path, lambda d: {**d, "note": {"a": 1}})
    after = onnx.load(str(path))
    assert after.graph.SerializeToString() == graph_before
    assert _props(path)["other"] == "kept"
    doc = read_metadata(after)
    assert doc["note"] == {"a": 1} and doc["labels"] == ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
    assert load_model(path).metadata.name == "color-test"  # still a valid wbc-batch model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left


def test_rewrite_to_another_file_pins_the_ir_version(tmp_path):
    src = build_color_model(tmp_path / "m.onnx")
    out = rewrite_metadata(src, lambda d: {**d, "name": "copy"}, output=tmp_path / "sub" / "copy.onnx", ir_version=7)
    assert onnx.load(str(out)).ir_version == 7 and read_metadata(onnx.load(str(out)))["name"] == "copy"
    assert read_metadata(onnx.load(str(src)))["name"] == "color-test"


def test_a_failed_check_leaves_the_file_as_it_was(tmp_path):
    path = build_color_model(tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(onnx.checker.ValidationError):
        rewrite_metadata(path, lambda d: {**d, "x": 1}, ir_version=1)  # IR 1 cannot hold opset 18
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_model_without_metadata_is_named(tmp_path):
    path = build_color_model(tmp_path / "bare.onnx", metadata=None)
    with pytest.raises(KeyError, match=METADATA_KEY):
        rewrite_metadata(path, lambda d: d)


def test_embed_metrics_stores_the_figures_not_the_rest(tmp_path):
    path = build_color_model(tmp_path / "m.onnx")
    embed_metrics(path, {"accuracy": 0.5, "macro_f1": 0.4, "n": 40, "eval_dir": "d", "predictions": [1, 2]})
    doc = json.loads(_props(path)[METADATA_KEY])
    assert doc["metrics"] == {"eval_dir": "d", "n": 40, "accuracy": 0.5, "macro_f1": 0.4}
    assert load_model(path).metadata.extra["metrics"]["accuracy"] == 0.5


def test_quantized_model_keeps_the_contract_and_records_how(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from wbc_batch.training.quantize import quantize_model

    src = build_color_model(tmp_path / "m.onnx")
    res = quantize_model(src, SAMPLE, n_calibration=32)
    q = onnx.load(res["output"])
    doc = read_metadata(q)
    assert q.ir_version == onnx.load(str(src)).ir_version
    assert doc["name"] == "color-test-int8" and doc["labels"] == read_metadata(onnx.load(str(src)))["labels"]
    assert doc["quantization"]["calibration"] == {"dir": str(SAMPLE), "images": 32, "method": "percentile 99.99"}
    assert load_model(res["output"]).labels == load_model(src).labels


def test_quantize_calibrates_on_images_decoded_as_the_model_decodes_them(tmp_path, monkeypatch):
    # The calibration decode dropped keep_aspect: a model that pads single-cell crops was calibrated on stretched ones.
    pytest.importorskip("onnxruntime.quantization")
    import wbc_batch.training.export as export_mod
    from wbc_batch.inference.model import default_model_path
    from wbc_batch.training.quantize import quantize_model

    seen = []

    def capture(paths, spec):
        seen.append(spec)
        raise RuntimeError("stop after the decode spec")

    monkeypatch.setattr(export_mod, "_sample_images", capture)
    with pytest.raises(RuntimeError, match="stop after"):
        quantize_model(default_model_path(), SAMPLE, output=tmp_path / "q.onnx", n_calibration=4)
    assert seen == [load_model(default_model_path()).metadata.preprocess] and seen[0].keep_aspect

