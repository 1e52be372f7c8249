"""wbc-batch adapt: batch-norm statistics re-measured on a lab's images, refolded exactly; no torch needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLE

onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

from wbc_batch.errors import WbcBatchError  # noqa: E402
from wbc_batch.inference.model import default_model_path, load_model  # noqa: E402
from wbc_batch.modelfile.adapt import AdaptError, _conv_output, adapt_model, channel_stats, decode  # noqa: E402

SHIPPED = default_model_path()
pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped model export/wbc-default.onnx missing")


def _doc(path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["wbc_batch"])


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt") / "lab.onnx"
    rep = adapt_model(SHIPPED, [SAMPLE], out)
    return out, rep


def test_the_shipped_model_carries_its_batch_norm_record():
    layers = _doc(SHIPPED)["batchnorm"]
    inits = {i.name: i for i in onnx.load(str(SHIPPED)).graph.initializer}
    assert len(layers) == 49  # efficientnet-lite0: stem, depthwise and pointwise convolutions, head
    for x in layers:
        n = numpy_helper.to_array(inits[f"{x['conv']}.weight_bias"]).shape[0]
        assert len(x["mean"]) == len(x["std"]) == len(x["eps"]) == n and min(x["std"]) > 0 and min(x["eps"]) > 0


def test_each_adapted_layer_has_the_trained_statistics_on_the_adaptation_images(adapted):
    out, rep = adapted
    assert (rep.images, rep.skipped, rep.layers) == (40, 0, 49)
    model, doc = onnx.load(str(out)), _doc(out)
    images, _ = decode(sorted(str(p) for p in SAMPLE.rglob("*.jpeg")), load_model(out).metadata)
    for x in doc["batchnorm"]:
        mean, var = channel_stats(model, _conv_output(model.graph, f"{x['conv']}.weight"), images)
        want_var = np.square(x["std"]) * var / (var + np.asarray(x["eps"]))  # std * y / sqrt(v + eps) has variance std^2 v/(v+eps)
        assert np.allclose(mean, x["mean"], atol=1e-3) and np.allclose(var, want_var, rtol=1e-3, atol=1e-5), x["conv"]


def test_the_adapted_model_keeps_everything_but_the_folded_weights(adapted):
    out, _ = adapted
    before, after = onnx.load(str(SHIPPED)), onnx.load(str(out))
    changed = {i.name for i, j in zip(before.graph.initializer, after.graph.initializer, strict=True)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))}
    assert changed == {f"{x['conv']}.{k}" for x in _doc(SHIPPED)["batchnorm"] for k in ("weight", "weight_bias")}
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    a, b = load_model(SHIPPED).metadata, load_model(out).metadata
    assert a.labels == b.labels and a.preprocess == b.preprocess and a.domain == b.domain
    ad = _doc(out)["adapted"]
    assert ad["images"] == 40 and ad["source"]["name"] == "wbc-default" and len(ad["source"]["sha256"]) == 64
    assert b.name == "wbc-default-adapted-sample_data"  # a report can tell it from its source


def test_an_adapted_model_takes_the_name_it_is_given(tmp_path):
    out = tmp_path / "lab.onnx"
    adapt_model(SHIPPED, [SAMPLE / "EOSINOPHIL", SAMPLE / "MONOCYTE"], out, max_images=8, name="lab-3")
    assert load_model(out).metadata.name == "lab-3"


def test_adapting_again_on_the_same_images_changes_nothing(adapted, tmp_path):
    out, _ = adapted
    again = tmp_path / "again.onnx"
    adapt_model(out, [SAMPLE], again)
    for i, j in zip(onnx.load(str(out)).graph.initializer, onnx.load(str(again)).graph.initializer, strict=True):
        assert np.allclose(numpy_helper.to_array(i), numpy_helper.to_array(j), rtol=1e-4, atol=1e-5), i.name


def test_a_model_without_the_record_is_refused(color_model, tmp_path):
    with pytest.raises(AdaptError, match="no batch-norm record") as e:
        adapt_model(color_model, [SAMPLE], tmp_path / "x.onnx")
    assert e.value.exit_code == 4 and not (tmp_path / "x.onnx").exists()


def test_no_usable_images_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(AdaptError, match="no image files") as e:
        adapt_model(SHIPPED, [tmp_path / "in"], tmp_path / "x.onnx")
    assert e.value.exit_code == 3
    (tmp_path / "in" / "a.jpeg").write_bytes(b"not a jpeg")
    with pytest.raises(AdaptError, match="could be decoded"):
        adapt_model(SHIPPED, [tmp_path / "in"], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WbcBatchError, match="cannot write the model to") as e:
        adapt_model(SHIPPED, [SAMPLE], tmp_path / "file" / "lab.onnx", max_images=8)
    assert e.value.exit_code == 5
