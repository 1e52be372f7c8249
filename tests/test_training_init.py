"""``train --init``: fine-tuning from a run folder or an exported ONNX model, the rebuilt head, class weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE, build_color_model, pickle_payload_run

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from wbc_batch.cli import main  # noqa: E402
from wbc_batch.inference.metadata import ModelError, ModelMetadata  # noqa: E402
from wbc_batch.inference.preprocess import PreprocessSpec, load_image  # noqa: E402
from wbc_batch.training.config import TrainConfig  # noqa: E402
from wbc_batch.training.init_weights import InitError, init_model, read_init  # noqa: E402
from wbc_batch.training.loop import class_weights, train  # noqa: E402
from wbc_batch.training.models import build_deployable  # noqa: E402
from wbc_batch.training.record import load_weights  # noqa: E402

SIZE = (48, 64)
CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")


def _cfg(data, run, **kw) -> TrainConfig:
    base = dict(arch="wbc-net", size=SIZE, crop=(0, 0), epochs=1, batch_size=8, val_fraction=0.3, patience=0, workers=1, threads=2)
    return TrainConfig(str(data), str(run), **{**base, **kw})


def _images() -> np.ndarray:
    return np.stack([load_image(p, PreprocessSpec(*SIZE)) for p in sorted(SAMPLE.rglob("*.jpeg"))])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny trained run and its ONNX export."""
    from wbc_batch.training.export import export_run

    tmp = tmp_path_factory.mktemp("init")
    train(_cfg(SAMPLE, tmp / "run", epochs=2), progress=False)
    export_run(tmp / "run", tmp / "tiny.onnx", check_dir=SAMPLE, check_images=40)
    return tmp / "run", tmp / "tiny.onnx"


def _fresh(classes=CLASSES, probabilities=True, background=None):
    torch.manual_seed(123)
    return build_deployable("wbc-net", len(classes), SIZE, None, probabilities=probabilities, background=background).eval()


def test_init_from_a_run_loads_its_weights_exactly(source):
    run, _ = source
    model = _fresh()
    done = init_model(model, read_init(run), "wbc-net", CLASSES, _images(), torch.device("cpu"))
    assert done == {"from": str(run), "kind": "run", "classes": list(CLASSES), "kept": list(CLASSES), "new": [], "rebuilt_batch_norms": 0}
    ref = load_weights(run / "best.pt")
    got = model.net.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_init_from_onnx_computes_what_the_onnx_file_computes(source):
    import onnxruntime as ort

    run, onnx_path = source
    src = read_init(onnx_path)
    # The dynamo exporter names initializers after the torch parameters and folds each batch norm into its conv.
    assert "features.0.0.weight" in src.state and "features.0.0.weight_bias" in src.state and "features.0.1.weight" not in src.state
    from wbc_batch.training.record import RunRecord

    model = _fresh(background=RunRecord.read(run).background)  # the exported graph balances to the run's background
    x = _images()
    done = init_model(model, src, "wbc-net", CLASSES, x, torch.device("cpu"))
    assert done["kind"] == "onnx" and done["rebuilt_batch_norms"] == 8 and done["new"] == []
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        got = model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(got - sess.run(None, {"image": x})[0]).max() < 1e-4
    # The rebuilt batch norms carry the statistics of the new images, so training mode starts normalised.
    bn = model.net.features[0][1]
    assert float(bn.running_var.min()) > 0 and not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_a_different_class_set_rebuilds_the_head_and_keeps_the_rest(source):
    run, _ = source
    ref = load_weights(run / "best.pt")
    classes = ("BASOPHIL", "LYMPHOCYTE", "NEUTROPHIL")
    model = _fresh(classes)
    fresh_row = model.net.head[1].weight[0].detach().clone()
    done = init_model(model, read_init(run), "wbc-net", classes, _images(), torch.device("cpu"))
    assert done["kept"] == ["LYMPHOCYTE", "NEUTROPHIL"] and done["new"] == ["BASOPHIL"]
    w, b = model.net.head[1].weight.detach(), model.net.head[1].bias.detach()
    assert w.shape == (3, ref["head.1.weight"].shape[1])
    assert torch.equal(w[1], ref["head.1.weight"][1]) and torch.equal(w[2], ref["head.1.weight"][3]) and torch.equal(b[2], ref["head.1.bias"][3])
    assert torch.equal(w[0], fresh_row)  # the new class starts fresh
    got = model.net.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref if not k.startswith("head."))


def test_train_init_records_where_it_started(source, tmp_path, capsys):
    run, onnx_path = source
    data = tmp_path / "data"
    for cls in ("LYMPHOCYTE", "NEUTROPHIL"):
        (data / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.jpeg")):
            (data / cls / p.name).symlink_to(p)
    train(_cfg(data, tmp_path / "ft", init_from=str(onnx_path)), progress=False)
    rec = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert rec["init_from"] == str(onnx_path) and rec["init"]["kind"] == "onnx" and rec["init"]["kept"] == ["LYMPHOCYTE", "NEUTROPHIL"]
    assert f"init: onnx {onnx_path} (head rebuilt: kept ['LYMPHOCYTE', 'NEUTROPHIL'], new [])" in capsys.readouterr().err
    # the source balanced its inputs to its training background: the fine-tuned model keeps that colour
    source_background = json.loads((run / "config.json").read_text())["background"]
    assert rec["init"]["background"] == "inherited" and rec["background"] == source_background and read_init(onnx_path).background == source_background


def test_init_inherits_the_source_crop_unless_the_run_sets_one(source, tmp_path, capsys):
    # A fine-tune that does not name a crop used the architecture's default, not the crop the source was trained
    # with: the network then saw cells at another scale than it learned (the shipped v3 samples to 112, the default 128).
    run, onnx_path = source
    assert read_init(onnx_path).crop == read_init(run).crop == (0, 0)
    train(_cfg(SAMPLE, tmp_path / "ft", init_from=str(onnx_path), crop=None), progress=False)
    rec = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert rec["crop"] == [0, 0] and rec["init"]["crop"] == "inherited"
    assert "crop (0, 0) inherited" in capsys.readouterr().err
    train(_cfg(SAMPLE, tmp_path / "own", init_from=str(onnx_path), crop=(40, 32)), progress=False)
    rec = json.loads((tmp_path / "own" / "config.json").read_text())
    assert rec["crop"] == [40, 32] and "crop" not in rec["init"]


def test_what_does_not_map_is_a_clear_error(source, tmp_path):
    run, _ = source
    with pytest.raises(InitError, match=r"is a wbc-net network; this run trains seed-cnn \(give --arch wbc-net\)"):
        init_model(_fresh(), read_init(run), "seed-cnn", CLASSES, _images(), torch.device("cpu"))
    with pytest.raises(InitError, match="no initializer is named after a network parameter"):
        read_init(build_color_model(tmp_path / "color.onnx"))
    with pytest.raises(InitError, match="expected a run folder or an exported .onnx model"):
        read_init(SAMPLE / "LYMPHOCYTE" / "_0_1022.jpeg")
    src = read_init(run)
    src.state["features.0.0.weight"] = src.state["features.0.0.weight"][:, :, :2]
    src.state["extra.weight"] = torch.zeros(1)
    with pytest.raises(InitError, match=r"2 weights do not map onto this wbc-net: features.0.0.weight: shape \(24, 3, 2, 3\) in --init, \(24, 3, 3, 3\) here; extra.weight: not a parameter"):
        init_model(_fresh(), src, "wbc-net", CLASSES, _images(), torch.device("cpu"))


def _train_init(init: Path, tmp_path: Path):
    args = ["train", str(SAMPLE), "-o", str(tmp_path / "ft"), "--init", str(init), "--epochs", "1", "--size", "48x64", "--crop-window", "0", "-q"]
    return CliRunner().invoke(main, args)


def test_train_init_from_weights_that_would_run_code_is_a_message_and_exit_4(tmp_path):
    run = pickle_payload_run(tmp_path / "run", tmp_path / "ran")
    res = _train_init(run, tmp_path)
    assert res.exit_code == 4, res.output
    assert res.output.startswith(f"wbc-batch: error: {run / 'best.pt'}: refused: loading it would call ")
    assert "Traceback" not in res.output and not (tmp_path / "ran").exists() and not (tmp_path / "ft" / "best.pt").exists()


def test_train_init_from_a_file_that_is_not_a_model_is_a_message(tmp_path):
    run = pickle_payload_run(tmp_path / "run", tmp_path / "ran")
    (tmp_path / "payload.onnx").write_bytes((run / "best.pt").read_bytes())
    res = _train_init(tmp_path / "payload.onnx", tmp_path)
    assert res.exit_code == 4, res.output
    assert res.output.startswith(f"wbc-batch: error: --init {tmp_path / 'payload.onnx'}: not an ONNX model (")
    res = _train_init(SAMPLE / "LYMPHOCYTE" / "_0_1022.jpeg", tmp_path)
    assert (res.exit_code, res.output) == (4, f"wbc-batch: error: --init {SAMPLE / 'LYMPHOCYTE' / '_0_1022.jpeg'}: expected a run folder or an exported .onnx model\n")
    assert not (tmp_path / "ran").exists()


def test_init_from_onnx_labels_given_as_a_string_is_refused(tmp_path):
    doc = ModelMetadata(labels=CLASSES, height=24, width=32).to_json_dict() | {"labels": "ABCD"}
    with pytest.raises(ModelError, match="^invalid model metadata: labels must be a list of class names, got a string: 'ABCD'$"):
        read_init(build_color_model(tmp_path / "m.onnx", metadata=doc))


def test_balanced_class_weights():
    w = class_weights(np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 3]), 4, "balanced")
    assert torch.allclose(w, torch.tensor([10 / 12, 10 / 24, 0.0, 10 / 4]))
    # A class of 1 image among 200 and 40: capped at 10x the most common class's weight.
    w = class_weights(np.array([0] * 200 + [1] * 40 + [2]), 3, "balanced")
    assert torch.allclose(w, torch.tensor([241 / 600, 241 / 120, 10 * 241 / 600]))
    assert class_weights(np.array([0, 1]), 2, "none") is None
    with pytest.raises(ValueError, match="choose balanced or none"):
        class_weights(np.array([0, 1]), 2, "sqrt")


def test_one_crop_flag_with_init_takes_the_other_from_the_init_models_crop(tmp_path):
    """--init a wbc-net run trained with crop 40 -> 32, and --crop-window alone: the crop size is the run's 32, not the
    default network's (efficientnet-lite0: 112), which the command line used to fill in before it knew --init's network."""
    train(_cfg(SAMPLE, tmp_path / "src", crop=(40, 32), max_per_class=2), progress=False)
    args = ["train", str(SAMPLE), "-o", str(tmp_path / "ft"), "--init", str(tmp_path / "src"), "--epochs", "1", "--max-per-class", "2",
            "--size", "48x64", "--crop-window", "44", "--batch-size", "4", "--workers", "1", "--precise-bn", "0", "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (rec["arch"], rec["crop"]) == ("wbc-net", [44, 32])


def test_with_crop_fills_the_parts_a_run_leaves_open():
    cfg = TrainConfig("d", "r", arch="wbc-net", crop=(200, None))
    assert cfg.with_crop((160, 96)).crop == (200, 96)  # the --init model's
    assert cfg.with_crop(None).crop == (200, 128)  # no --init: the network's default
    assert cfg.with_crop((0, 0)).crop == (200, 128)  # the --init model saw no crop: the network's default, not a 0-pixel one
    assert TrainConfig("d", "r", arch="wbc-net").with_crop((160, 96)).crop == (160, 96)  # no crop flag: all inherited
    assert TrainConfig("d", "r", arch="wbc-net", crop=(0, 0)).with_crop((160, 96)).crop == (0, 0)  # --crop-window 0: none
