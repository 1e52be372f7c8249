"""wbc_batch.training.calibrate at export: the run's training files as reference, its validation split (or a folder) held out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import SAMPLE

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")


def _train(run, **kw):
    from wbc_batch.training.loop import TrainConfig, train

    # No test here depends on what this tiny model learns (its errors differ between torch builds and CPUs): they check
    # which images each fit used; the fitting rules themselves are tested on synthetic logits in test_trust.py.
    base = dict(arch="wbc-net", size=(48, 64), crop=(0, 0), epochs=2, batch_size=8, val_fraction=0.3, patience=0, workers=1, threads=2)
    train(TrainConfig(str(SAMPLE), str(run), **{**base, **kw}), progress=False)
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("run"))


def _export(run, out):
    from wbc_batch.training.export import export_run

    export_run(run, out, check_dir=SAMPLE, check_images=40)
    return out


def test_run_split_is_the_runs_own(tiny_run):
    from wbc_batch.training.calibrate import run_split
    from wbc_batch.training.record import RunRecord

    rec = RunRecord.read(tiny_run)
    train, val, _ = run_split(tiny_run, rec.classes)
    assert (len(train.paths), len(val.paths)) == (rec.n_train, rec.n_val)
    assert not set(train.paths) & set(val.paths) and sorted(set(val.labels)) == [0, 1, 2, 3]


def test_export_fits_on_the_validation_split_when_it_is_held_out(tiny_run, tmp_path):
    from wbc_batch.inference.model import load_model
    from wbc_batch.training.calibrate import calibrate_export
    from wbc_batch.training.record import RunRecord

    out = _export(tiny_run, tmp_path / "m.onnx")
    rec = RunRecord.read(tiny_run)
    sections = calibrate_export(tiny_run, out)
    md = load_model(out).metadata
    assert md.extra["calibration"] == sections["calibration"]
    cal = sections["calibration"]
    # the temperature was fitted on the validation split (applied or, by the rules, kept on record under held_out)
    fit = cal if cal["method"] == "temperature" else cal["held_out"]
    assert fit["data"] == {"path": f"{SAMPLE} (the run's validation split)", "files": rec.n_val}
    assert sections["domain"]["threshold_from"]["files"] == rec.n_val and "sample" in sections["domain"]["threshold_from"]  # 12 < 200
    assert sections["domain"]["reference"]["files"] == rec.n_train
    assert sections["domain"]["threshold_from"]["held_out"] is True and md.domain.output == "ood_score"
    import onnx

    g = onnx.load(str(out)).graph  # the nucleus term reads the network's own float copy of the image: no second cast
    assert "nucleus_x" not in {o for n in g.node for o in n.output} and "nucleus_blocks" in {o for n in g.node for o in n.output}


def test_a_follow_crop_models_nucleus_term_reads_the_crops_own_map(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from wbc_batch.inference.preprocess import PreprocessSpec, load_image
    from wbc_batch.training.calibrate import calibrate_export
    from wbc_batch.training.export import load_run
    from wbc_batch.training.trust import crop_stain_map

    run = _train(tmp_path / "run", size=(120, 160), crop=(80, 32), crop_follow=True, epochs=1)
    out = _export(run, tmp_path / "m.onnx")
    calibrate_export(run, out)
    g = onnx.load(str(out)).graph
    outputs = {o for n in g.node for o in n.output}
    assert crop_stain_map(g) is not None and "nucleus_blocks" not in outputs and "nucleus_signal" in outputs
    model = onnx.load(str(out))
    model.graph.output.append(onnx.helper.make_tensor_value_info("nucleus_signal", onnx.TensorProto.FLOAT, None))
    x = np.stack([load_image(p, PreprocessSpec(120, 160, keep_aspect=True)) for p in sorted(SAMPLE.rglob("*.jpeg"))[:6]])
    (signal,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["nucleus_signal"], {"image": x})
    crop = load_run(run)[0].crop
    with torch.no_grad():
        score = crop._score(torch.from_numpy(x).permute(0, 3, 1, 2).float())
        smooth = torch.nn.functional.avg_pool2d(score, 9, 1, 4, count_include_pad=False).flatten(1)
    np.testing.assert_allclose(signal, (smooth.max(1).values - smooth.mean(1)).numpy(), rtol=1e-4)


@pytest.mark.slow
def test_export_without_a_held_out_split_keeps_temperature_one_and_says_why(tmp_path):
    from wbc_batch.training.calibrate import calibrate_export
    from wbc_batch.training.record import RunRecord

    run = _train(tmp_path / "run", val_fraction=0.0)
    assert RunRecord.read(run).val_is_train
    sections = calibrate_export(run, _export(run, tmp_path / "m.onnx"))
    assert sections["calibration"] == {
        "method": "none", "temperature": 1.0,
        "why": "the run validated on its training data (too few groups to hold any out) and no --calibration-dir was given",
    }
    assert sections["domain"]["threshold_from"]["held_out"] is False and sections["domain"]["reference"]["files"] == 40


def rec_train(run) -> int:
    from wbc_batch.training.record import RunRecord

    return RunRecord.read(run).n_train


def test_cli_export_calibration_dir(tiny_run, tmp_path):
    from wbc_batch.cli import main
    from wbc_batch.inference.model import load_model
    from wbc_batch.training.calibrate import trust_lines

    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["export", str(tiny_run), "-o", str(out), "--check-dir", str(SAMPLE), "--calibration-dir", str(SAMPLE)])
    assert res.exit_code == 0, res.output
    md = load_model(out).metadata
    cal = md.extra["calibration"]
    assert (cal if cal["method"] == "temperature" else cal["held_out"])["data"] == {"path": str(SAMPLE), "files": 40}
    assert md.extra["domain"]["threshold_from"]["path"] == str(SAMPLE) and md.extra["domain"]["reference"]["files"] == rec_train(tiny_run)
    lines = res.output.strip().splitlines()
    assert len(lines) == 4 and lines[-1] == f"wrote {out}"
    assert lines[0].startswith("parity: onnxruntime vs torch on ") and "same label on 100.0%" in lines[0]
    assert lines[1:3] == trust_lines({"calibration": cal, "domain": md.extra["domain"]})  # what was written into the model
    res = CliRunner().invoke(main, ["export", str(tiny_run), "-o", str(out), "--check-dir", str(SAMPLE), "--calibration-dir", str(SAMPLE), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["trust"]["domain"]["threshold"] == load_model(out).metadata.domain.threshold
