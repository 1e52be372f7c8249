"""wbc-batch calibrate: registered in the CLI, writes a model whose domain check classify uses."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import SAMPLE, build_color_model

from wbc_batch.cli import main
from wbc_batch.inference.model import load_model


def test_calibrate_writes_a_model_with_calibration_and_a_domain_check(tmp_path, trust_model):
    out = tmp_path / "t.onnx"
    color_model = build_color_model(tmp_path / "c.onnx", height=240, width=320)  # as the trust fixture's
    args = ["calibrate", str(color_model), "--reference-dir", str(SAMPLE), "--calibration-dir", str(SAMPLE), "--in-domain-quantile", "0.9", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    md = load_model(out).metadata
    assert md.domain == load_model(trust_model).metadata.domain  # the same fit as the fixture's
    assert md.extra["calibration"]["method"] == "temperature"
    assert f"domain check: ood_score <= {md.domain.threshold:.3f} is in domain (reference 40 images; threshold = 0.9 quantile of held-out scores)" in res.output
    assert res.output.strip().endswith(f"wrote {out}")


def test_calibrate_refuses_a_model_that_has_a_check_and_data_without_classes(tmp_path, trust_model, color_model):
    res = CliRunner().invoke(main, ["calibrate", str(trust_model), "--reference-dir", str(SAMPLE), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "already has a domain check" in res.output
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpeg").write_bytes(next(SAMPLE.rglob("*.jpeg")).read_bytes())
    res = CliRunner().invoke(main, ["calibrate", str(color_model), "--reference-dir", str(tmp_path / "flat"), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "no image under a folder named after one of the model's labels" in res.output
    assert not (tmp_path / "x.onnx").exists()
