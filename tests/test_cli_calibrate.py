"""wbc-batch calibrate: registered in the CLI, writes a model whose domain check classify uses, refits a model that has one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from conftest import ROOT, SAMPLE, build_color_model

from wbc_batch.cli import main
from wbc_batch.inference.model import load_model
from wbc_batch.inference.preprocess import load_image
from wbc_batch.modelfile.calibrate import labelled_set


def test_calibrate_writes_a_model_with_calibration_and_a_domain_check(tmp_path, trust_model):
    out = tmp_path / "t.onnx"
    color_model = build_color_model(tmp_path / "c.onnx", height=240, width=320)  # as the trust fixture's
    args = ["calibrate", str(color_model), "--reference-dir", str(SAMPLE), "--calibration-dir", str(SAMPLE), "--in-domain-quantile", "0.9", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    md = load_model(out).metadata
    assert md.domain == load_model(trust_model).metadata.domain  # the same fit as the fixture's
    assert md.extra["calibration"]["method"] == "temperature"
    assert f"domain check: in domain when ood_score <= {md.domain.threshold:.3f} (0.9 quantile of 40 held-out images; reference 40 images)\n" in res.output
    assert "replaced" not in res.output and "few images" not in res.output.splitlines()[1]  # 40 images are enough for a 0.9 quantile
    assert res.output.strip().endswith(f"wrote {out}")


def test_calibrate_refits_the_check_a_shipped_model_carries(tmp_path):
    """Every export carries a temperature and ood_score: calibrate strips them and fits both anew on the bare network."""
    shipped = ROOT / "export" / "wbc-default.onnx"
    out = tmp_path / "new.onnx"
    args = ["calibrate", str(shipped), "--reference-dir", str(SAMPLE), "--calibration-dir", str(SAMPLE), "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    md, old = load_model(out).metadata, load_model(shipped).metadata
    dom, cal = md.extra["domain"], md.extra["calibration"]
    assert dom["reference"] == {"path": str(SAMPLE), "files": 40} and dom["threshold_from"]["files"] == 40
    assert md.extra["training"] == old.extra["training"] and md.labels == old.labels  # only the check changed
    # the same graph as the shipped one (4 domain layers, the nucleus term, the temperature): nothing left behind, nothing twice
    new_g, old_g = onnx.load(str(out)).graph, onnx.load(str(shipped)).graph
    assert sorted(n.name for n in new_g.node) == sorted(n.name for n in old_g.node)
    assert sorted(i.name for i in new_g.initializer) == sorted(i.name for i in old_g.initializer)
    paths = labelled_set(SAMPLE, md.labels).paths
    x = np.stack([load_image(p, md.preprocess) for p in paths])
    run = lambda m: ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(["probabilities", "ood_score"], {"image": x})  # noqa: E731
    (probs, score), (old_probs, _) = run(out), run(shipped)
    # probabilities: the network's own logits (the shipped ones times its temperature) over the new one, whichever way the rule went
    old_t = old.extra["calibration"]["temperature"]
    z = np.log(old_probs.astype(np.float64)) * old_t / cal["temperature"]
    np.testing.assert_allclose(probs, np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True), atol=1e-5)
    # a 0.995 quantile of 40 scores lies between the two largest: exactly one image is above the threshold, and the metadata says so
    assert int((score > dom["threshold"]).sum()) == 1 and "lies between their two largest" in dom["threshold_from"]["sample"]
    lines = res.output.strip().splitlines()
    assert lines[0] == (f"replaced what the model carried (temperature {old_t:.3f}; in domain when ood_score <= {old.domain.threshold:.3f}): "
                        "fitted anew on its bare network")
    assert lines[1] == ("calibration: temperature 1.000 (none: too few held-out errors to fit a temperature (7 in 40 images; it takes 10): "
                        "give more held-out images with --calibration-dir)")  # the network is fixed: 7 of the 40 sample images wrong
    assert lines[2] == (f"domain check: in domain when ood_score <= {dom['threshold']:.3f} (0.995 quantile of 40 held-out images; reference 40 images); "
                        f"{dom['threshold_from']['sample']}")
    assert lines[3] == f"wrote {out}"


def test_calibrate_refuses_data_without_classes(tmp_path, color_model):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpeg").write_bytes(next(SAMPLE.rglob("*.jpeg")).read_bytes())
    res = CliRunner().invoke(main, ["calibrate", str(color_model), "--reference-dir", str(tmp_path / "flat"), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "no image under a folder named after one of the model's labels" in res.output
    assert not (tmp_path / "x.onnx").exists()
