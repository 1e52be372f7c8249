"""wbc_batch.training.export: the whole export built in memory and written once; its calibration takes the run's training
files as reference and its validation split (or a folder) as held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLE

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")


def _train(run, **kw):
    from wbc_batch.training.loop import TrainConfig, train

    # No test here depends on what this tiny model learns (its errors differ between torch builds and CPUs): they check
    # which images each fit used; the fitting rules themselves are tested on synthetic logits in test_modelfile_trust.py.
    base = dict(arch="wbc-net", size=(48, 64), crop=(0, 0), epochs=2, batch_size=8, val_fraction=0.3, patience=0, workers=1, threads=2)
    train(TrainConfig(str(SAMPLE), str(run), **{**base, **kw}), progress=False)
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("run"))


def _export(run, out, **kw) -> dict:
    from wbc_batch.training.export import ExportOptions, export_model

    return export_model(run, out, ExportOptions(check_dir=SAMPLE, check_images=40, **kw))


def test_run_split_is_the_runs_own(tiny_run):
    from wbc_batch.training.export import run_split
    from wbc_batch.training.record import RunRecord

    rec = RunRecord.read(tiny_run)
    train, val, _ = run_split(tiny_run, rec.classes)
    assert (len(train.paths), len(val.paths)) == (rec.n_train, rec.n_val)
    assert not set(train.paths) & set(val.paths) and sorted(set(val.labels)) == [0, 1, 2, 3]


def test_export_fits_on_the_validation_split_when_it_is_held_out(tiny_run, tmp_path):
    from wbc_batch.inference.model import load_model
    from wbc_batch.training.record import RunRecord

    out = tmp_path / "m.onnx"
    sections = _export(tiny_run, out)["trust"]
    rec = RunRecord.read(tiny_run)
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
    from wbc_batch.modelfile.trust import crop_stain_map
    from wbc_batch.training.export import load_run

    run = _train(tmp_path / "run", size=(120, 160), crop=(80, 32), crop_follow=True, epochs=1)
    out = tmp_path / "m.onnx"
    _export(run, out)
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
    from wbc_batch.training.record import RunRecord

    run = _train(tmp_path / "run", val_fraction=0.0)
    assert RunRecord.read(run).val_is_train
    sections = _export(run, tmp_path / "m.onnx")["trust"]
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
    from wbc_batch.modelfile.calibrate import trust_lines

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


def test_export_builds_the_model_in_memory_and_writes_it_once(tiny_run, tmp_path, monkeypatch):
    """Graph, calibration, metrics: one write of the float model; the INT8 model is quantised from the bytes written."""
    import hashlib

    import wbc_batch.modelfile.proto as proto_mod
    import wbc_batch.modelfile.quantize as quantize_mod
    from wbc_batch.inference.model import load_model

    writes, save = [], proto_mod.save_checked

    def counted(proto, path, **kw):
        writes.append(Path(path).name)
        save(proto, path, **kw)

    for module in (proto_mod, quantize_mod):
        monkeypatch.setattr(module, "save_checked", counted)
    out = tmp_path / "m.onnx"
    res = _export(tiny_run, out, eval_dir=SAMPLE, int8_dir=SAMPLE)
    assert writes == ["m.onnx", "m.int8.onnx"] and sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]
    md = load_model(out).metadata
    assert md.extra["metrics"] == {k: res["eval"][k] for k in md.extra["metrics"]} and md.extra["metrics"]["n"] == 40
    assert md.extra["calibration"] == res["trust"]["calibration"] and md.extra["domain"] == res["trust"]["domain"]
    q = load_model(res["int8"]["output"]).metadata
    assert res["int8"]["output"] == str(tmp_path / "m.int8.onnx") and q.name == "m-int8"
    assert q.extra["quantization"]["float_model_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert {k: v for k, v in q.extra.items() if k != "quantization"} == md.extra


def test_export_writes_nothing_when_a_step_before_the_write_fails(tiny_run, tmp_path, monkeypatch):
    import wbc_batch.training.export as export_mod

    def fail(*args, **kw):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(export_mod, "calibrate_run", fail)
    with pytest.raises(RuntimeError, match="calibration failed"):
        _export(tiny_run, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_embed_metrics_stores_the_figures_not_the_rest(tmp_path):
    import onnx
    from conftest import build_color_model

    from wbc_batch.inference.model import read_metadata
    from wbc_batch.modelfile.proto import metadata_doc
    from wbc_batch.training.export import embed_metrics

    proto = onnx.load(str(build_color_model(tmp_path / "m.onnx")))
    graph = proto.graph.SerializeToString()
    embed_metrics(proto, {"accuracy": 0.5, "macro_f1": 0.4, "n": 40, "eval_dir": "d", "predictions": [1, 2]})
    assert metadata_doc(proto)["metrics"] == {"eval_dir": "d", "n": 40, "accuracy": 0.5, "macro_f1": 0.4}
    assert read_metadata(proto).extra["metrics"]["accuracy"] == 0.5 and proto.graph.SerializeToString() == graph
