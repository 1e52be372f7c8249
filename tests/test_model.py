"""wbc_batch.inference.model: loading an ONNX file, checking it against its metadata, running it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import LABELS, build_color_model, color_model_reference

from wbc_batch.inference import model as model_mod
from wbc_batch.inference.metadata import ModelError, ModelMetadata
from wbc_batch.inference.model import file_sha256, load_model, read_metadata, resolve_providers


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 24, 32, 3), dtype=np.uint8)


def test_load_and_predict_matches_reference(color_model):
    m = load_model(color_model, threads=1)
    assert m.labels == LABELS
    assert m.metadata.name == "color-test" and m.metadata.arch == "mean-colour"
    assert (m.metadata.height, m.metadata.width) == (24, 32)
    assert m.sha256 == hashlib.sha256(color_model.read_bytes()).hexdigest() == file_sha256(color_model)
    assert m.providers == ("CPUExecutionProvider",)
    assert m.fixed_batch is None
    x = _batch(7)
    p = m.predict(x)
    assert p.shape == (7, 4) and p.dtype == np.float32
    np.testing.assert_allclose(p, color_model_reference(x), atol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)


def test_read_metadata(color_model):
    md = read_metadata(color_model)
    assert isinstance(md, ModelMetadata) and md.labels == LABELS


def test_read_metadata_of_a_proto_in_memory_is_the_files(color_model, tmp_path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(color_model))
    assert read_metadata(proto) == read_metadata(color_model) == load_model(color_model, threads=1).metadata
    bare = onnx.load(str(build_color_model(tmp_path / "bare.onnx", metadata=None)))
    with pytest.raises(ModelError, match="carries no 'wbc_batch' metadata"):
        read_metadata(bare)


def test_logits_output_gets_a_softmax(tmp_path):
    """output kind 'logits' means the consumer applies softmax (here: on top of the graph's own)."""
    md = ModelMetadata(labels=LABELS, height=24, width=32, output_kind="logits")
    path = build_color_model(tmp_path / "l.onnx", metadata=md.to_json_dict())
    x = _batch(3)
    ref = color_model_reference(x)
    want = np.exp(ref) / np.exp(ref).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(load_model(path, threads=1).predict(x), want, atol=1e-6)


@pytest.mark.parametrize("fixed, n", [(1, 5), (4, 6), (4, 4), (4, 1)])
def test_static_batch_graph_is_fed_in_slices(tmp_path, fixed, n):
    """An export with a fixed batch dimension must still classify any batch size."""
    path = build_color_model(tmp_path / "fixed.onnx", input_shape=[fixed, 24, 32, 3])
    m = load_model(path, threads=1)
    assert m.fixed_batch == fixed
    x = _batch(n, seed=n)
    np.testing.assert_allclose(m.predict(x), color_model_reference(x), atol=1e-6)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match=r"^model file not found: .*nope\.onnx$"):
        load_model(tmp_path / "nope.onnx")


def test_missing_default_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(model_mod, "default_model_path", lambda: tmp_path / "wbc-default.onnx")
    with pytest.raises(ModelError, match=r"the default model is missing from this installation"):
        load_model(None)


def test_default_model_path_points_into_the_checkout_or_package():
    p = model_mod.default_model_path()
    assert p.name == "wbc-default.onnx" and p.parent.name in ("export", "_model")


def test_not_onnx(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_text("definitely not a protobuf")
    with pytest.raises(ModelError, match=r"is not a loadable ONNX model: "):
        load_model(p)


def test_no_metadata(tmp_path):
    p = build_color_model(tmp_path / "bare.onnx", metadata=None)
    with pytest.raises(ModelError, match="carries no 'wbc_batch' metadata"):
        load_model(p)


def _meta(**kw) -> dict:
    return ModelMetadata(**{"labels": LABELS, "height": 24, "width": 32, **kw}).to_json_dict()


@pytest.mark.parametrize(
    "metadata, message",
    [
        (_meta(height=224, width=224), r"the graph's input shape \['N', 24, 32, 3\] does not match the metadata \(NHWC 224x224x3"),
        (_meta(layout="NCHW"), r"does not match the metadata \(NCHW 24x32x3"),
        (_meta(labels=LABELS[:3]), r"output 'probabilities' has shape \['N', 4\]; expected \[N, 3\] for 3 labels"),
        (_meta(input_name="pixels"), "metadata names input 'pixels' but the graph's input is 'image'"),
        (_meta(output_name="scores"), r"metadata names output 'scores' but the graph's outputs are \['probabilities'\]"),
        (_meta(dtype="float32"), r"metadata says input dtype float32 but the graph takes tensor\(uint8\)"),
    ],
)
def test_metadata_that_contradicts_the_graph(tmp_path, metadata, message):
    p = build_color_model(tmp_path / "bad.onnx", metadata=metadata)
    with pytest.raises(ModelError, match=message):
        load_model(p)


def test_invalid_metadata_json(tmp_path):
    p = build_color_model(tmp_path / "bad.onnx", metadata="{broken")
    with pytest.raises(ModelError, match="metadata is not valid JSON"):
        load_model(p)
    p = build_color_model(tmp_path / "bad2.onnx", metadata=json.dumps({**_meta(), "schema_version": 9}))
    with pytest.raises(ModelError, match="schema_version 9 is not supported"):
        load_model(p)


def test_providers():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ModelError, match="onnxruntime provider 'CUDAExecutionProvider' is not available here .*onnxruntime-gpu"):
            resolve_providers("cuda")
    with pytest.raises(ModelError, match="'NoSuchProvider' is not available"):
        resolve_providers("NoSuchProvider")


def test_infer_returns_the_domain_score_next_to_the_probabilities(trust_model, color_model):
    from conftest import sample_images, trust_reference

    from wbc_batch.inference.preprocess import PreprocessSpec, load_image

    paths = sample_images()[:7]
    x = np.stack([load_image(p, PreprocessSpec(240, 320)) for p in paths])  # the trust fixture takes whole fields
    m = load_model(trust_model)
    probs, ood = m.infer(x)
    ref_probs, ref_ood = trust_reference(trust_model, paths)
    np.testing.assert_array_equal(probs, ref_probs)
    np.testing.assert_array_equal(ood, ref_ood)
    assert ood.shape == (7,) and np.array_equal(m.predict(x), probs)
    x = np.stack([load_image(p, PreprocessSpec(24, 32)) for p in paths])
    old_probs, old_ood = load_model(color_model).infer(x)  # a model without a domain check
    assert old_ood is None and np.allclose(old_probs, color_model_reference(x), atol=1e-6)


def test_a_static_batch_graph_with_a_domain_check_is_fed_in_slices(trust_model, tmp_path):
    import onnx
    from conftest import sample_images, trust_reference

    from wbc_batch.inference.preprocess import PreprocessSpec, load_image

    proto = onnx.load(str(trust_model))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # the same graph, exported with batch 4
    onnx.save(proto, str(tmp_path / "fixed.onnx"))
    m = load_model(tmp_path / "fixed.onnx")
    paths = sample_images()[:6]
    probs, ood = m.infer(np.stack([load_image(p, PreprocessSpec(240, 320)) for p in paths]))
    ref_probs, ref_ood = trust_reference(trust_model, paths)
    assert m.fixed_batch == 4 and ood.shape == (6,)
    np.testing.assert_allclose(ood, ref_ood, rtol=1e-6)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-7)


def _with_domain(src, dst, section, extra_output: str | None = None):
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    doc = json.loads(props["wbc_batch"])
    doc["domain"] = section
    if extra_output:
        proto.graph.output.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    del proto.metadata_props[:]
    helper.set_model_props(proto, {**props, "wbc_batch": json.dumps(doc)})
    onnx.save(proto, str(dst))
    return dst


def test_a_domain_section_without_its_graph_output_is_refused(color_model, tmp_path):
    bad = _with_domain(color_model, tmp_path / "m.onnx", {"output": "ood_score", "threshold": 2.0})
    with pytest.raises(ModelError, match=r"metadata names a domain-check output 'ood_score' but the graph's outputs are \['probabilities'\]"):
        load_model(bad)


def test_a_domain_output_must_be_one_score_per_image(color_model, tmp_path):
    bad = _with_domain(color_model, tmp_path / "m.onnx", {"output": "logits", "threshold": 2.0}, extra_output="logits")
    with pytest.raises(ModelError, match=r"domain-check output 'logits' has shape .*; expected \[N\]"):
        load_model(bad)
