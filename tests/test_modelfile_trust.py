"""wbc_batch.modelfile.trust and .calibrate: temperature and domain score fitted, written into the graph, read back.

Uses the tiny colour model (features = mean colour, Gemm, Softmax) so every output has a numpy reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import LABELS, ROOT, SAMPLE, _color_weights, build_color_model

from wbc_batch.inference.preprocess import PreprocessSpec, load_image
from wbc_batch.modelfile.calibrate import LabelledSet, _calibration, calibrate_model, labelled_set, quantile_note
from wbc_batch.modelfile.trust import (
    DomainFit,
    add_trust_outputs,
    block_outputs,
    find_head,
    fit_domain_check,
    fit_reference,
    fit_temperature,
    nucleus_model,
    strip_trust_outputs,
    with_probe_outputs,
)


def _softmax(z, t=1.0):
    e = np.exp(z / t - (z / t).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(20000, 4))
    y = np.array([rng.choice(4, p=p) for p in _softmax(z, 2.0)])
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.05)


def test_reference_score_is_about_one_in_domain_and_large_far_away():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 6000)
    means = np.array([[0, 0, 0, 0], [50, 0, 0, 0], [0, 50, 0, 0]], dtype=float)  # far apart: nearest = own class
    f = means[y] + rng.normal(0, [1, 2, 0.5, 1], size=(6000, 4))
    ref = fit_reference(f, y, 3)
    assert ref.scores(f).mean() == pytest.approx(1.0, abs=0.05)  # E[chi2_D] / D = 1
    assert ref.scores(np.array([[0, 0, 10, 0]]))[0] == pytest.approx(100 / 0.25 / 4, rel=0.05)


def test_a_class_without_reference_images_gets_no_centre():
    # A lab's reviewed cells may hold none of a class: the others' centres are fitted, and a cell is scored against the nearest.
    f = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0], [12.0, -1.0]])
    ref = fit_reference(f, [0, 0, 2, 2], 3)
    full = fit_reference(np.vstack([f, f[:1] + 100]), [0, 0, 2, 2, 1], 3)
    assert ref.means.shape == (2, 2) and full.means.shape == (3, 2)
    np.testing.assert_allclose(ref.scores(f[:1]), ref.scores(f[1:2]))  # both one unit from class 0's centre
    with pytest.raises(ValueError, match="no image"):
        fit_reference(np.zeros((0, 2)), [], 3)


def test_trust_outputs_match_numpy(tmp_path):
    model = onnx.load(str(build_color_model(tmp_path / "c.onnx", height=24, width=32)))
    head = find_head(model, "probabilities")
    assert (head.logits, head.features, head.n_features) == ("logits", "m", 3)
    rng = np.random.default_rng(2)
    ref = fit_reference(rng.normal(100, 20, size=(200, 3)), rng.integers(0, 4, 200), 4)
    out = add_trust_outputs(model, head, 1.7, DomainFit((head.features,), (ref,), (1.0,)))
    x = rng.integers(0, 256, size=(5, 24, 32, 3), dtype=np.uint8)
    probs, score = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    w, b = _color_weights(4)
    feats = x.astype(np.float32).mean(axis=(1, 2))
    np.testing.assert_allclose(probs, _softmax(feats @ w + b, 1.7), atol=1e-6)
    np.testing.assert_allclose(score, ref.scores(feats), rtol=1e-4)
    assert [o.name for o in out.graph.output] == ["probabilities", "ood_score"]


def test_find_head_refuses_a_graph_without_softmax(tmp_path):
    model = onnx.load(str(build_color_model(tmp_path / "c.onnx")))
    with pytest.raises(ValueError, match="not produced by a Softmax"):
        find_head(model, "logits")


def test_calibrate_model_writes_a_model_that_reads_back(tmp_path):
    src = build_color_model(tmp_path / "c.onnx", height=240, width=320)  # full fields: every one shows its nucleus
    sections = calibrate_model(src, SAMPLE, tmp_path / "t.onnx", calibration_dir=SAMPLE, quantile=0.9)
    model = onnx.load(str(tmp_path / "t.onnx"))
    doc = json.loads({p.key: p.value for p in model.metadata_props}["wbc_batch"])
    assert doc["domain"] == sections["domain"] and doc["labels"] == list(LABELS)
    assert doc["domain"]["reference"]["files"] == 40 and doc["domain"]["threshold_from"]["held_out"] is True
    assert doc["calibration"]["method"] == "temperature" and doc["calibration"]["data"]["files"] == 40
    # the threshold is the 0.9 quantile of the calibration images' scores: 4 of 40 lie above it
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([load_image(p, PreprocessSpec(240, 320)) for p in labelled_set(SAMPLE, LABELS).paths])
    _, score = sess.run(None, {"image": x})
    assert int((score > doc["domain"]["threshold"]).sum()) == 4
    assert (_nucleus_numpy(x) > doc["domain"]["nucleus"]["threshold"]).all()  # no field raised by the nucleus term


def test_calibrate_without_held_out_data_keeps_temperature_one(tmp_path):
    src = build_color_model(tmp_path / "c.onnx", height=24, width=32)
    sections = calibrate_model(src, SAMPLE, tmp_path / "t.onnx")
    assert sections["calibration"]["temperature"] == 1.0 and sections["calibration"]["method"] == "none"
    assert sections["domain"]["threshold_from"]["held_out"] is False


def test_labelled_set_matches_folders_to_labels_case_insensitively(tmp_path):
    (tmp_path / "eosinophil").mkdir()
    (tmp_path / "PLATELET").mkdir()
    src = next(SAMPLE.glob("EOSINOPHIL/*.jpeg"))
    (tmp_path / "eosinophil" / "a.jpeg").write_bytes(src.read_bytes())
    (tmp_path / "PLATELET" / "b.jpeg").write_bytes(src.read_bytes())
    s = labelled_set(tmp_path, LABELS)
    assert s.labels == [0] and s.skipped_classes == ["PLATELET"]


def _nucleus_numpy(x: np.ndarray) -> np.ndarray:
    """The nucleus signal written out in numpy, pixel by pixel, as the trust module doc defines it."""
    from wbc_batch.evaluation.report_images import _box_mean

    n, h, w, _ = x.shape
    b = x[:, : h // 4 * 4, : w // 4 * 4].astype(np.float64).reshape(n, h // 4, 4, w // 4, 4, 3).mean((2, 4))  # 4x4 block means
    pooled = (b[..., 2] - b[..., 0] - 0.5 * b[..., 1] + 127.5) * (b.sum(-1) > 60)
    return np.array([_box_mean(p, 9).max() - _box_mean(p, 9).mean() for p in pooled])


def _fields() -> np.ndarray:
    spec = PreprocessSpec(240, 320, keep_aspect=True)
    cells = [load_image(p, spec) for p in labelled_set(SAMPLE, LABELS).paths[::10]]
    blank = np.full((240, 320, 3), (222, 224, 219), np.uint8)  # a field's background, no cell
    padded = cells[0].copy()
    padded[:, :80] = 0  # black padding never counts as stain
    return np.stack([*cells, blank, padded])


def test_nucleus_signal_matches_numpy_on_real_fields():
    x = _fields()
    (signal,) = ort.InferenceSession(nucleus_model().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    np.testing.assert_allclose(signal, _nucleus_numpy(x), rtol=1e-4)
    assert signal[:4].min() > 80 and signal[4] == 0.0  # cells vs an empty field


def test_ood_score_is_raised_only_for_an_image_without_a_nucleus(tmp_path):
    model = onnx.load(str(build_color_model(tmp_path / "c.onnx", height=240, width=320)))
    head = find_head(model, "probabilities")
    rng = np.random.default_rng(3)
    ref = fit_reference(rng.normal(180, 20, size=(200, 3)), rng.integers(0, 4, 200), 4)
    x = _fields()
    check = DomainFit((head.features,), (ref,), (1.0,))
    plain = add_trust_outputs(model, head, 1.0, check)
    raised = add_trust_outputs(model, head, 1.0, check, nucleus=(2.0, 30.0))
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[1]  # noqa: E731
    maha, score = run(plain), run(raised)
    signal = _nucleus_numpy(x)
    expected = np.maximum(maha, 2.0 * 30.0 / np.maximum(signal, 1.0))
    np.testing.assert_allclose(score, expected, rtol=1e-4)
    assert np.array_equal(score[:4], maha[:4]) and score[4] > 2.0  # cells keep their score; the empty field is out of domain


def test_temperature_none_keeps_one_and_records_what_fitting_would_give(tmp_path):
    src = build_color_model(tmp_path / "c.onnx", height=24, width=32)
    fitted = calibrate_model(src, SAMPLE, tmp_path / "fit.onnx", calibration_dir=SAMPLE)
    kept = calibrate_model(src, SAMPLE, tmp_path / "t.onnx", calibration_dir=SAMPLE, temperature="none")
    cal = kept["calibration"]
    assert (cal["method"], cal["temperature"]) == ("none", 1.0) and "--temperature none" in cal["why"]
    assert cal["held_out"] == fitted["calibration"] and kept["domain"] == fitted["domain"]  # the threshold is placed alike
    x = np.stack([load_image(p, PreprocessSpec(24, 32)) for p in labelled_set(SAMPLE, LABELS).paths[:5]])
    probs, _ = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    w, b = _color_weights(4)
    np.testing.assert_allclose(probs, _softmax(x.astype(np.float32).mean(axis=(1, 2)) @ w + b, 1.0), atol=1e-6)
    with pytest.raises(ValueError, match="unknown temperature"):
        calibrate_model(src, SAMPLE, tmp_path / "x.onnx", temperature="auto")


def _held_out(labels) -> LabelledSet:
    return LabelledSet(root="lab", paths=[f"{i}.png" for i in range(len(labels))], labels=list(map(int, labels)))


def _brute_force_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The NLL minimum over a grid of 4,001 temperatures in fit_temperature's range (steps of 0.15%)."""
    ts = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
    s = logits[None] / ts[:, None, None]
    s = s - s.max(2, keepdims=True)
    nll = (np.log(np.exp(s).sum(2)) - s[:, np.arange(len(labels)), labels]).mean(1)
    return float(ts[np.argmin(nll)])


def test_a_temperature_is_the_nll_minimum_and_applied_when_it_lowers_held_out_ece():
    rng = np.random.default_rng(11)
    z = rng.normal(0, 3, (400, 4))
    y = np.array([rng.choice(4, p=p) for p in _softmax(z, 2.0)])  # labels drawn at T = 2: the logits are overconfident
    t, section = _calibration(_held_out(y), z, "fit", "")
    assert section["method"] == "temperature" and t == section["temperature"] == round(fit_temperature(z, y), 6)
    assert t == pytest.approx(_brute_force_temperature(z, y), rel=2e-3) and t == pytest.approx(2.0, rel=0.15)
    assert section["ece_after"] < section["ece_before"]
    assert "sample" not in section  # 400 images: enough


def test_a_held_out_set_with_few_errors_keeps_temperature_one_and_says_why():
    """3 errors in 60: the NLL keeps falling as T shrinks over the right ones; fitting would push every probability to 1."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 60)
    logits = rng.normal(0, 1, (60, 4))
    logits[np.arange(60), labels] += 6.0
    logits[:3] = logits[:3, ::-1]  # the label's +6 moves to another column: 3 images wrong
    assert int((logits.argmax(1) != labels).sum()) == 3
    t, section = _calibration(_held_out(labels), logits, "fit", "")
    assert t == 1.0 and (section["method"], section["temperature"]) == ("none", 1.0)
    assert section["why"] == ("too few held-out errors to fit a temperature (3 in 60 images; it takes 10): "
                              "give more held-out images with --calibration-dir")
    assert section["held_out"]["temperature"] == pytest.approx(_brute_force_temperature(logits, labels), rel=2e-3)  # what fitting gives


def test_a_temperature_that_makes_held_out_calibration_worse_is_not_applied():
    """80 right images (40 at confidence 0.75, 40 at 0.9997) and 10 wrong at 0.99: the NLL fit softens every
    probability to pay for the confident errors, and the right ones' underconfidence then outweighs the gain."""
    margin = np.r_[np.full(40, np.log(3)), np.full(40, 8.0), np.full(10, np.log(99))]
    logits = np.stack([margin, np.zeros_like(margin)], 1)
    labels = np.r_[np.zeros(80, int), np.ones(10, int)]
    t, section = _calibration(_held_out(labels), logits, "fit", "")
    fit = section["held_out"]
    assert t == 1.0 and (section["method"], section["temperature"]) == ("none", 1.0)
    assert fit["method"] == "temperature" and fit["temperature"] == pytest.approx(_brute_force_temperature(logits, labels), rel=2e-3)
    assert (fit["ece_before"], fit["ece_after"]) == (0.221, 0.3009)
    assert section["why"] == (f"the temperature that fits the held-out images best ({fit['temperature']:.3f}) makes their calibration "
                              "worse (ECE 0.221 -> 0.301 on 90 held-out images), so it is not applied: temperature 1; few images: "
                              "a temperature fitted on 90 held-out images (10 wrong) is a rough estimate; 200 or more "
                              "(--calibration-dir) place it")


def test_small_sets_say_how_many_images_a_fit_needs():
    assert quantile_note(44, 0.995) == ("few images: a 0.995 quantile of 44 scores lies between their two largest (it is all but their "
                                        "maximum, as the nucleus rule's 0.005 quantile is all but their minimum); it takes more than 200 "
                                        "held-out images (--calibration-dir) to place it")
    assert quantile_note(200, 0.995) is not None and quantile_note(201, 0.995) is None and quantile_note(40, 0.9) is None
    assert quantile_note(10, 1.0) is None  # the maximum by definition, whatever the count
    # the claim holds: up to 200 scores, numpy's 0.995 quantile lies between the two largest; from 201 it does not
    for n, between in ((44, True), (200, True), (201, False)):
        s = np.sort(np.random.default_rng(n).normal(size=n))
        assert (s[-2] < np.quantile(s, 0.995) <= s[-1]) == between


def _conv_model(h: int = 24, w: int = 32) -> onnx.ModelProto:
    """uint8 NHWC -> Conv-Relu -> Conv-Relu -> strided Conv-Relu -> mean -> Gemm -> Softmax: two stages."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    arr = {"k1": rng.normal(0, 0.02, (4, 3, 3, 3)), "k2": rng.normal(0, 0.3, (6, 4, 3, 3)), "k3": rng.normal(0, 0.3, (5, 6, 3, 3)),
           "wt": rng.normal(0, 0.5, (5, 4)), "bias": rng.normal(0, 0.1, 4)}
    nodes = [
        helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2]), helper.make_node("Cast", ["t"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "k1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "k3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]), helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]), helper.make_node("Flatten", ["g"], ["feats"]),
        helper.make_node("Gemm", ["feats", "wt", "bias"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", h, w, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arr.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_domain_check_scores_each_stage_and_the_graph_matches_numpy():
    model = _conv_model()
    head = find_head(model, "probabilities")
    # r2 feeds the strided conv (end of the first stage); r1 is inside it; r3 is pooled into the penultimate features
    assert block_outputs(model) == ["r2"]
    rng = np.random.default_rng(8)
    sess = ort.InferenceSession(with_probe_outputs(model, head, ["r2"]).SerializeToString(), providers=["CPUExecutionProvider"])
    layers = lambda x: sess.run(["probe_block0", "feats"], {"image": x})  # noqa: E731
    ref_x, held_x = (rng.integers(60, 200, size=(n, 24, 32, 3), dtype=np.uint8) for n in (300, 200))
    y = rng.integers(0, 4, 300)
    check = fit_domain_check(("r2", "feats"), layers(ref_x), y, 4, layers(held_x), 0.99)
    # each layer's scale is its own held-out quantile: 1% of the held-out images lie above it in each layer
    per_layer = [r.scores(f) / s for r, f, s in zip(check.references, layers(held_x), check.scales, strict=True)]
    assert [float(np.mean(v > 1)) for v in per_layer] == [0.01, 0.01]
    out = add_trust_outputs(model, head, 1.0, check)
    x = np.concatenate([rng.integers(60, 200, size=(4, 24, 32, 3), dtype=np.uint8), np.full((1, 24, 32, 3), (230, 200, 40), np.uint8)])
    score = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(["ood_score"], {"image": x})[0]
    np.testing.assert_allclose(score, check.scores(layers(x)), rtol=1e-4)
    assert score[4] > 10 * score[:4].max()  # a flat yellow image is far from random fields in every layer


def test_calibrate_records_each_layer_of_the_domain_check(tmp_path):
    src = tmp_path / "conv.onnx"
    model = _conv_model(240, 320)
    doc = json.loads(next(p.value for p in onnx.load(str(build_color_model(tmp_path / "c.onnx"))).metadata_props if p.key == "wbc_batch"))
    doc["input"]["height"], doc["input"]["width"] = 240, 320
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"wbc_batch": json.dumps(doc)})
    onnx.save(model, src)
    sections = calibrate_model(src, SAMPLE, tmp_path / "out.onnx", calibration_dir=SAMPLE)
    layers = sections["domain"]["layers"]
    assert [(d["tensor"], d["features"]) for d in layers] == [("r2", 6), ("feats", 5)] and all(d["scale"] > 0 for d in layers)


def test_stripping_the_trust_outputs_gives_back_the_bare_network():
    """Temperature, every domain layer and the nucleus term go; the graph is byte for byte the one they were added to."""
    model = _conv_model(240, 320)
    head = find_head(model, "probabilities")
    rng = np.random.default_rng(9)
    feats = [rng.normal(size=(40, 6)), rng.normal(size=(40, 5))]
    check = fit_domain_check(("r2", "feats"), feats, np.arange(40) % 4, 4, feats, 0.9)
    full = add_trust_outputs(model, head, 1.7, check, (2.0, 30.0))
    assert len(full.graph.node) > len(model.graph.node) + 20 and [o.name for o in full.graph.output] == ["probabilities", "ood_score"]
    assert strip_trust_outputs(full, "probabilities").SerializeToString() == model.SerializeToString()
    assert strip_trust_outputs(model, "probabilities").SerializeToString() == model.SerializeToString()  # nothing to strip


@pytest.mark.parametrize("name", ["wbc-default.onnx", "wbc-v3.onnx", "wbc-v1.onnx"])
def test_stripping_a_shipped_model_keeps_its_probabilities(name):
    """Every shipped model (checks on 4 or 1 layers, with and without the nucleus term; a temperature or none) strips to the network alone."""
    shipped = onnx.load(str(ROOT / "export" / name))
    bare = strip_trust_outputs(shipped, "probabilities")
    onnx.checker.check_model(bare, full_check=True)
    names = {n.name for n in bare.graph.node} | {i.name for i in bare.graph.initializer}
    assert [o.name for o in bare.graph.output] == ["probabilities"] and not any(n.startswith(("domain", "nucleus", "calibration")) for n in names)
    find_head(bare, "probabilities")  # the Softmax reads the Gemm again
    x = np.stack([load_image(p, PreprocessSpec(240, 320, keep_aspect=name != "wbc-v1.onnx")) for p in sorted(SAMPLE.rglob("*.jpeg"))[:4]])
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["probabilities"], {"image": x})[0]  # noqa: E731
    t = json.loads({p.key: p.value for p in shipped.metadata_props}["wbc_batch"]).get("calibration", {}).get("temperature", 1.0)
    z = np.log(run(shipped).astype(np.float64)) * t  # the bare network's logits, up to a constant per image
    np.testing.assert_allclose(run(bare), np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True), atol=1e-5)
