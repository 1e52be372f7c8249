"""Torch side: data split, the seed CNN's exact structure, a real short training run, export parity,
and the exported model reloaded by classify. Runs in the `train` tox env (marker `torch`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, SHARED_DATA, needs_shared_data

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from wbc_batch.preprocess import PreprocessSpec, load_image  # noqa: E402
from wbc_batch.train.data import decode_all, group_split, scan_class_folders  # noqa: E402
from wbc_batch.train.models import Deployable, SeedCNN, WbcNet, build  # noqa: E402


def test_scan_groups_by_source_and_class():
    files = scan_class_folders(SAMPLE)
    assert files.classes == ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
    assert len(files.paths) == 40
    i = files.paths.index(str(SAMPLE / "LYMPHOCYTE" / "_0_1022.jpeg"))
    assert files.groups[i] == "LYMPHOCYTE/0" and files.targets[i] == 1
    # The same source number in another class is another source image.
    j = files.paths.index(str(SAMPLE / "MONOCYTE" / "_0_1123.jpeg"))
    assert files.groups[j] == "MONOCYTE/0"


def test_group_split_keeps_sources_on_one_side_and_every_class_in_val():
    rng = np.random.default_rng(1)
    targets = np.repeat(np.arange(4), 100)
    groups = [f"{t}/{rng.integers(0, 12)}" for t in targets]
    tr, va = group_split(targets, groups, 0.25, seed=3)
    assert len(tr) + len(va) == 400 and not set(tr) & set(va)
    g = np.asarray(groups)
    assert not set(g[tr]) & set(g[va])
    assert set(targets[va]) == {0, 1, 2, 3}
    # Deterministic for a seed.
    tr2, va2 = group_split(targets, groups, 0.25, seed=3)
    assert np.array_equal(va, va2)


@needs_shared_data()
def test_group_split_on_real_train_set_does_not_leak():
    files = scan_class_folders(SHARED_DATA / "TRAIN")
    assert len(set(files.groups)) == 277
    tr, va = group_split(files.targets, files.groups, 0.15, seed=0)
    g = np.asarray(files.groups)
    assert not set(g[tr]) & set(g[va])
    assert 0.08 < len(va) / len(files.paths) < 0.25


def test_training_decode_path_is_the_classify_path():
    spec = PreprocessSpec(60, 80)
    paths = [str(p) for p in sorted(SAMPLE.rglob("*.jpeg"))[:6]]
    arr, ok = decode_all(paths, spec, workers=1)
    assert ok.all()
    assert np.array_equal(arr, np.stack([load_image(p, spec) for p in paths]))


def test_seed_cnn_is_the_report_model():
    net = SeedCNN(4, (60, 80))
    layers = [type(m).__name__ for m in list(net.features) + list(net.head)]
    assert layers == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Dropout", "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    c1, c2 = net.features[0], net.features[2]
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.padding) == (3, 32, (3, 3), (0, 0))
    assert (c2.in_channels, c2.out_channels, c2.kernel_size) == (32, 64, (3, 3))
    assert net.features[5].p == 0.25 and net.head[2].p == 0.5
    assert net.head[0].in_features == 64 * 28 * 38 and net.head[0].out_features == 128
    assert sum(p.numel() for p in net.parameters()) == 896 + 18496 + (64 * 28 * 38 * 128 + 128) + (128 * 4 + 4)


def test_deployable_normalises_inside_and_outputs_probabilities():
    torch.manual_seed(0)
    m = Deployable(WbcNet(4, (48, 64))).eval()
    x = torch.randint(0, 256, (3, 48, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        p = m(x)
    assert p.shape == (3, 4)
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from wbc_batch.train.loop import TrainConfig, train

    run = tmp_path_factory.mktemp("run")
    res = train(TrainConfig(str(SAMPLE), str(run), arch="wbc-net", size=(48, 64), epochs=2, batch_size=8, val_fraction=0.3, patience=0, workers=1, threads=2), progress=False)
    assert res.epochs_run == 2
    return run


def test_training_run_writes_the_run_dir(tiny_run):
    for name in ("best.pt", "last.pt", "config.json", "history.csv", "curves.png", "val_confusion.json", "val_confusion.png"):
        assert (tiny_run / name).is_file(), name
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["classes"] == ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"] and cfg["size"] == [48, 64]
    # Validation sources never appear in training.
    assert cfg["n_train"] + cfg["n_val"] == 40 and cfg["n_val"] > 0
    lines = (tiny_run / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_macro_f1") and len(lines) == 3


def test_training_is_deterministic_on_cpu(tiny_run, tmp_path):
    from wbc_batch.train.loop import TrainConfig, train

    train(TrainConfig(str(SAMPLE), str(tmp_path), arch="wbc-net", size=(48, 64), epochs=2, batch_size=8, val_fraction=0.3, patience=0, workers=1, threads=2), progress=False)
    a = torch.load(tiny_run / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "last.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_parity_and_reload_by_classify(tiny_run, tmp_path):
    import onnx

    from wbc_batch.export import PARITY_ATOL, export_run, load_run
    from wbc_batch.model import load_model
    from wbc_batch.runner import RunnerOptions, classify

    out = tmp_path / "tiny.onnx"
    rep = export_run(tiny_run, out, check_dir=SAMPLE, check_images=40)
    assert rep.parity_images == 40 and rep.argmax_agreement == 1.0
    assert max(rep.max_abs_diff_batch1, rep.max_abs_diff_odd_batch, rep.max_abs_diff_all) <= PARITY_ATOL
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 9 and [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 48, 64, 3]

    m = load_model(out)
    assert m.labels == ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
    assert m.metadata.extra["training"]["data"]["files"] == 40
    preds = list(classify([SAMPLE], out, options=RunnerOptions(workers=1)))
    assert len(preds) == 40 and all(p.status == "ok" for p in preds)
    net, cfg, _ = load_run(tiny_run)
    spec = PreprocessSpec(48, 64)
    x = torch.from_numpy(np.stack([load_image(SAMPLE / p.path, spec) for p in preds]))
    with torch.inference_mode():
        ref = net(x).numpy()
    got = np.asarray([p.probabilities for p in preds])
    assert np.abs(got - ref).max() < 1e-5  # CSV precision is 1e-6
    assert [p.label for p in preds] == [cfg["classes"][i] for i in ref.argmax(1)]


def test_build_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        build("resnet-9000", 4, (60, 80))
