"""The architecture registry: the CLI reads it, train checks its contracts before decoding, ImageNet weights map
onto timm's EfficientNet-Lite0 tensor for tensor, and efficientnet-lite0 meets every contract wbc-net meets
(export parity, domain check, batch-norm refold, --init from ONNX) end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from adabn_reference import remeasured_outputs
from conftest import SAMPLE

from wbc_batch.training import archs
from wbc_batch.training.config import TrainConfig

LITE0 = "efficientnet-lite0"


# --- the registry, torch-free -------------------------------------------------------------------------------------

def test_cli_arch_choices_and_help_come_from_the_registry():
    from wbc_batch.cli.train import crop_option, train_cmd

    params = {p.name: p for p in train_cmd.params}
    assert list(params["arch"].type.choices) == list(archs.ARCHS) == ["wbc-net", "seed-cnn", LITE0]
    assert list(params["pretrained"].type.choices) == ["imagenet", "none"]
    for a in archs.ARCHS.values():
        assert a.name in params["arch"].help and f"{a.default_size[0]}x{a.default_size[1]} {a.name}" in params["size"].help
    lite = TrainConfig("d", "r", arch=LITE0)
    assert replace(lite, crop=crop_option(None, 96)).resolved_crop() == (160, 96)
    assert replace(lite, crop=crop_option(200, None)).resolved_crop() == (200, 112)


def test_registry_and_train_cli_import_neither_torch_nor_timm():
    probe = ("import importlib, json, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm'))))")
    out = subprocess.run([sys.executable, "-c", probe, "wbc_batch.training.archs", "wbc_batch.cli.train", "wbc_batch.training.config"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_pretrained_start_follows_the_registry_and_init_replaces_it():
    assert TrainConfig("d", "r", arch=LITE0).resolved_pretrained() == "imagenet"
    assert TrainConfig("d", "r", arch=LITE0, pretrained="none").resolved_pretrained() == "none"
    assert TrainConfig("d", "r", arch=LITE0, init_from="m.onnx").resolved_pretrained() == "none"
    assert TrainConfig("d", "r", arch="wbc-net").resolved_pretrained() == "none"


def test_the_default_network_is_pretrained_and_init_brings_its_own():
    # Transfer by default: no --arch trains efficientnet-lite0 from ImageNet, for its own (fewer) epochs; with --init and
    # no --arch the network is the source model's, with that network's epochs; what a run names is kept.
    plain = TrainConfig("d", "r")
    assert plain.arch is None and plain.resolved_pretrained() == "imagenet"
    assert archs.DEFAULT_ARCH == LITE0 and plain.resolved().arch == LITE0 and plain.resolved().epochs == archs.LITE0_EPOCHS == 10
    assert TrainConfig("d", "r", init_from="m.onnx").resolved("wbc-net") == TrainConfig("d", "r", init_from="m.onnx", arch="wbc-net", epochs=30)
    assert TrainConfig("d", "r", arch=LITE0, init_from="m.onnx").resolved("wbc-net").arch == LITE0  # then init says what does not map
    assert TrainConfig("d", "r", epochs=3).resolved().epochs == 3
    lite = TrainConfig("d", "r", arch=LITE0)
    assert lite.resolved_crop() == (160, 112) and lite.net_input_size() == (112, 112)
    a = archs.get(LITE0)
    assert a.mean == (127 / 255,) * 3 and a.std == (128 / 255,) * 3 and archs.get("wbc-net").mean == archs.STAIN_MEAN
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        archs.get("resnet")
    with pytest.raises(ValueError, match="wbc-net has no 'imagenet' weights"):
        archs.get("wbc-net").weights_named("imagenet")


# --- contracts (torch) ----------------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _arch(builder, contracts=("logits", "stages", "batchnorm")) -> archs.Arch:
    return archs.Arch("test-net", "a test network", builder, (32, 32), (0, 0), contracts=frozenset(contracts))


@pytest.mark.torch
@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_every_registered_network_meets_its_declared_contracts(name):
    _torch()
    from wbc_batch.training.contracts import contract_problems
    from wbc_batch.training.models import build

    a = archs.get(name)
    for m in a.requires:
        pytest.importorskip(m)
    size = TrainConfig("d", "r", arch=name).net_input_size()
    assert contract_problems(build(name, 5, size), a, 5, size) == []


@pytest.mark.torch
def test_a_broken_contract_is_named():
    torch = _torch()
    from torch import nn

    from wbc_batch.training.contracts import contract_problems

    def net(*layers):
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    good = net(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))
    assert contract_problems(good, _arch(None), 4, (16, 16)) == []
    bn_after_relu = net(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, 2, 1))
    assert contract_problems(bn_after_relu, _arch(None), 4, (16, 16)) == [
        "batchnorm: 2 does not read a convolution's output", "stages: no ReLU of a convolution feeds a strided convolution or max pool"]
    no_stage = net(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    assert contract_problems(no_stage, _arch(None), 4, (16, 16)) == ["stages: no ReLU of a convolution feeds a strided convolution or max pool"]
    assert contract_problems(no_stage, _arch(None, ("logits", "batchnorm")), 4, (16, 16)) == []
    softmax_out = nn.Sequential(good, nn.Softmax(dim=1))
    assert contract_problems(softmax_out, _arch(None), 4, (16, 16)) == ["logits: the output is not the last Linear layer's, applied to (batch, features)"]
    assert contract_problems(good, _arch(None), 3, (16, 16)) == ["the output is (2, 4) for a batch of 2, not (2, 3)"]
    too_small = contract_problems(nn.Sequential(nn.Conv2d(3, 8, 5), nn.Flatten(), nn.Linear(8, 4)), _arch(None), 4, (3, 3))
    assert len(too_small) == 1 and too_small[0].startswith("a 3x3 input does not pass through the network")
    assert torch.is_grad_enabled() and good.training  # the check leaves the network and torch as it found them


@pytest.mark.torch
def test_train_stops_before_decoding_when_the_network_breaks_a_contract(tmp_path, monkeypatch):
    _torch()
    from torch import nn

    from wbc_batch.training import loop
    from wbc_batch.training.contracts import ContractError

    def no_stage(num_classes, size):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    monkeypatch.setitem(archs.ARCHS, "test-net", _arch(no_stage))
    monkeypatch.setattr(loop, "load_data", lambda *a, **k: pytest.fail("decoded images before checking the network"))
    cfg = TrainConfig(str(SAMPLE), str(tmp_path / "run"), arch="test-net", size=(32, 32), crop=(0, 0), epochs=1)
    with pytest.raises(ContractError, match=r"--arch test-net at 32x32 breaks its declared contracts: stages: no ReLU") as e:
        loop.train(cfg, progress=False)
    assert e.value.exit_code == 2


@pytest.mark.torch
def test_missing_pretrained_weights_are_an_error_at_the_start(tmp_path, monkeypatch):
    _torch()
    from wbc_batch.training.contracts import check_start
    from wbc_batch.training.nets import WbcNet
    from wbc_batch.training.pretrained import PretrainedError

    gone = archs.Weights("imagenet", "no-such-weights-pkg", "no_such_weights_pkg", "w.pth", 1, "MIT", "test")
    monkeypatch.setitem(archs.ARCHS, "test-net", archs.Arch("test-net", "t", WbcNet, (32, 32), (0, 0), weights=(gone,)))
    cfg = TrainConfig("d", "r", arch="test-net", size=(32, 32))
    with pytest.raises(PretrainedError, match="no-such-weights-pkg, which is not installed: pip install no-such-weights-pkg"):
        check_start(cfg, 4)
    check_start(TrainConfig("d", "r", arch="test-net", size=(32, 32), pretrained="none"), 4)  # random start: nothing to find
    with pytest.raises(PretrainedError, match="wbc-net has no 'imagenet' weights"):
        check_start(TrainConfig("d", "r", arch="wbc-net", pretrained="imagenet"), 4)


@pytest.mark.torch
def test_run_records_from_before_pretrained_starts_read_as_random_starts():
    _torch()
    from wbc_batch.inference.preprocess import PreprocessSpec
    from wbc_batch.training.record import RunRecord

    old = {"data_dir": "d", "run_dir": "r", "arch": "wbc-net", "classes": ["A", "B"], "preprocess": PreprocessSpec(48, 64).to_dict(),
           "n_train": 4, "n_val": 2}
    assert RunRecord.from_dict(old).config.pretrained == "none"
    assert RunRecord.from_dict({**old, "pretrained": "imagenet", "arch": LITE0}).config.resolved_pretrained() == "imagenet"


@pytest.mark.torch
def test_a_network_whose_library_is_missing_is_a_usage_error(monkeypatch):
    _torch()
    from wbc_batch.training.contracts import ContractError
    from wbc_batch.training.models import build

    monkeypatch.setitem(archs.ARCHS, "test-net", archs.Arch("test-net", "t", None, (32, 32), (0, 0), requires=("no_such_module_x",)))
    with pytest.raises(ContractError, match="--arch test-net needs no_such_module_x: pip install no_such_module_x") as e:
        build("test-net", 4, (32, 32))
    assert e.value.exit_code == 2


@pytest.mark.torch
def test_map_in_order_pairs_by_position_and_refuses_other_shapes():
    torch = _torch()
    from wbc_batch.training.pretrained import PretrainedError, map_in_order

    src = {"_a.weight": torch.ones(2, 3), "_b.bias": torch.zeros(2), "_fc.weight": torch.ones(1000, 2), "_fc.bias": torch.ones(1000)}
    dst = {"a.w": torch.zeros(2, 3), "b.b": torch.ones(2), "head.weight": torch.zeros(4, 2), "head.bias": torch.zeros(4)}
    got = map_in_order(src, dst, "head")
    assert list(got) == ["a.w", "b.b"] and got["a.w"] is src["_a.weight"] and got["b.b"] is src["_b.bias"]
    with pytest.raises(PretrainedError, match=r"1 pretrained tensors do not fit the network, e.g. _b.bias \(2,\) -> b.b \(3,\)"):
        map_in_order(src, {**dst, "b.b": torch.ones(3)}, "head")
    with pytest.raises(PretrainedError, match="the weights hold 2 tensors before the classifier, the network 1"):
        map_in_order(src, {"a.w": dst["a.w"], "head.weight": dst["head.weight"], "head.bias": dst["head.bias"]}, "head")


def _lite0_net(classes: int = 4):
    _torch()
    pytest.importorskip("timm")
    pytest.importorskip(archs.EFFICIENTNET_LITE0_IMAGENET.module)
    from wbc_batch.training.models import build

    return build(LITE0, classes, (64, 64))


@pytest.mark.torch
def test_imagenet_weights_map_onto_timm_lite0_tensor_for_tensor():
    torch = _torch()
    from wbc_batch.training.pretrained import load_pretrained, weights_file

    net = _lite0_net(4)
    done = load_pretrained(net, archs.get(LITE0), "imagenet")
    src = torch.load(weights_file(archs.EFFICIENTNET_LITE0_IMAGENET), weights_only=True)
    state = net.state_dict()
    pairs = {"_conv_stem.weight": "conv_stem.weight", "_bn0.running_var": "bn1.running_var",
             "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight", "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
             "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight", "_conv_head.weight": "conv_head.weight", "_bn1.bias": "bn2.bias"}
    for s, t in pairs.items():
        assert torch.equal(src[s], state[t]), (s, t)
    assert done["tensors"] == 294 and done["fresh"] == ["classifier.bias", "classifier.weight"] and done["licence"] == "Apache-2.0"
    # 4 classes here, 1000 in ImageNet: the run's own classifier, from zero, so every class starts equally likely.
    assert not net.classifier.weight.any() and not net.classifier.bias.any()
    net.eval()
    with torch.no_grad():
        logits = net(torch.rand(3, 3, 112, 112))
    assert torch.equal(logits, torch.zeros(3, 4))
    assert net.bn1.eps == 1e-3  # the epsilon the weights were trained with


@pytest.mark.torch
def test_lite0_weights_expect_the_registry_normalisation():
    """Why the registry's (x - 127) / 128 and not ImageNet's mean/std: the stem's batch norm was fitted to it."""
    torch = _torch()
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_sample_images

    from wbc_batch.training.pretrained import load_pretrained

    net = _lite0_net(1000)
    load_pretrained(net, archs.get(LITE0), "imagenet")
    x = torch.from_numpy(np.stack([im[:224, :224] for im in load_sample_images().images])).permute(0, 3, 1, 2).float() / 255

    def ratio(mean, std):
        y = net.conv_stem((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        return float((y.var((0, 2, 3)) / net.bn1.running_var).median())

    a = archs.get(LITE0)
    with torch.no_grad():
        assert 0.5 < ratio(a.mean, a.std) < 2.5 and ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 4


# --- efficientnet-lite0 end to end through the CLI ------------------------------------------------------------------

def _cli(*args):
    from click.testing import CliRunner

    from wbc_batch.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def lite0_model(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-epoch efficientnet-lite0 run (ImageNet start) and its export: a 64-px crop of a 96x128 field, 8 images a class."""
    _lite0_net()
    d = tmp_path_factory.mktemp("lite0")
    run, model = d / "run", d / "lite0.onnx"
    _cli("train", SAMPLE, "-o", run, "--arch", LITE0, "--max-per-class", 8, "--epochs", 1, "--size", "96x128", "--crop-window", 80,
         "--crop-size", 64, "--batch-size", 8, "--precise-bn", 2, "--workers", 1, "--threads", 2, "-q")
    _cli("export", run, "-o", model, "--temperature", "none")
    return run, model


@pytest.mark.torch
def test_lite0_trains_exports_classifies_adapts_and_reports(lite0_model, tmp_path):
    import onnx

    from wbc_batch.inference.model import load_model
    from wbc_batch.modelfile.proto import metadata_doc

    run, model = lite0_model
    rec = json.loads((run / "config.json").read_text())
    assert rec["arch"] == LITE0 and rec["pretrained"] == "imagenet" and rec["crop"] == [80, 64]
    assert rec["init"]["kind"] == "pretrained" and rec["init"]["tensors"] == 294
    proto = onnx.load(str(model))
    doc = metadata_doc(proto)
    assert doc["arch"] == LITE0 and doc["training"]["config"]["pretrained"] == "imagenet"
    assert doc["normalisation"] == {"mean": [0.498039] * 3, "std": [0.501961] * 3}
    p = doc["export_parity"]
    assert p["tolerance"] == archs.get(LITE0).parity_atol and p["argmax_agreement"] == 1.0 and p["max_abs_diff_all"] <= p["tolerance"]
    assert [o.name for o in proto.graph.output] == ["probabilities", "ood_score"]
    assert len(doc["batchnorm"]) == 49  # every folded batch norm, the 16 depthwise convolutions' included
    _cli("classify", SAMPLE, "-m", model, "-o", tmp_path / "p.csv", "-q")
    assert len((tmp_path / "p.csv").read_text().strip().splitlines()) == 41
    _cli("adapt", model, SAMPLE, "-o", tmp_path / "ad.onnx")
    assert load_model(tmp_path / "ad.onnx").metadata.extra["adapted"]["layers"] == 49
    out = _cli("info", tmp_path / "ad.onnx")
    assert f"arch {LITE0}" in out and "49 folded batch norms" in out


@pytest.mark.torch
def test_lite0_domain_check_reads_each_stage(lite0_model):
    import onnx

    from wbc_batch.modelfile.trust import block_outputs

    proto = onnx.load(str(lite0_model[1]))
    producers = {o: n for n in proto.graph.node for o in n.output}
    stages = block_outputs(proto)
    # The ReLU6 (Clip) before each of the four stride-2 depthwise convolutions: 96, 144, 240 and 672 channels at 64 px.
    assert len(stages) == 4 and all(producers[s].op_type == "Clip" for s in stages)
    layers = [n for n in proto.graph.initializer if n.name.startswith("domain") and n.name.endswith("_whitening")]
    assert sorted(list(i.dims)[0] for i in layers) == [96, 144, 240, 672, 1280]


@pytest.mark.torch
def test_lite0_adapt_refolds_what_torch_batch_norm_measures(lite0_model, tmp_path):
    """As for wbc-net, with depthwise convolutions and timm's BatchNormAct2d; within the architecture's parity tolerance."""
    torch = _torch()
    from wbc_batch.inference.model import load_model
    from wbc_batch.inference.preprocess import PreprocessSpec, load_image
    from wbc_batch.modelfile.adapt import adapt_model
    from wbc_batch.training.export import load_run
    from wbc_batch.training.init_weights import conv_bn_pairs

    run, model_path = lite0_model
    ad = tmp_path / "ad.onnx"
    adapt_model(model_path, [SAMPLE], ad)
    model, rec, _ = load_run(run)
    x = torch.from_numpy(np.stack([load_image(p, PreprocessSpec(96, 128)) for p in sorted(str(p) for p in SAMPLE.rglob("*.jpeg"))]))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 49
    assert sum(model.net.get_submodule(conv).groups > 1 for conv, _ in conv_bn_pairs(model.net)) == 16  # depthwise
    want = remeasured_outputs(model, x)
    got = load_model(ad).predict(x.numpy())
    assert np.abs(got - want).max() < archs.get(LITE0).parity_atol
    assert not np.allclose(load_model(model_path).predict(x.numpy()), want, atol=1e-2)


def _init_lite0(run: Path, source: Path, images: np.ndarray):
    """A fresh efficientnet-lite0 deployable with the run's crop and background, initialised from ``source`` as --init does."""
    torch = _torch()
    from wbc_batch.training.init_weights import init_model, read_init
    from wbc_batch.training.models import build_deployable

    rec = json.loads((run / "config.json").read_text())
    src = read_init(source)
    assert src.arch == LITE0 and src.crop == (80, 64)
    model = build_deployable(LITE0, 4, (96, 128), (80, 64), follow=True, background=rec["background"])
    done = init_model(model, src, LITE0, tuple(rec["classes"]), images, torch.device("cpu"))
    assert done["kept"] == rec["classes"] and done["new"] == []
    return model, done


@pytest.mark.torch
def test_lite0_init_from_its_onnx_file_computes_what_the_file_computes(lite0_model):
    torch = _torch()
    from wbc_batch.inference.model import load_model
    from wbc_batch.inference.preprocess import PreprocessSpec, load_image

    run, model_path = lite0_model
    x = np.stack([load_image(p, PreprocessSpec(96, 128)) for p in sorted(str(p) for p in SAMPLE.rglob("*.jpeg"))])
    model, done = _init_lite0(run, model_path, x)
    assert done["kind"] == "onnx" and done["rebuilt_batch_norms"] == 49
    model.eval()
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(load_model(model_path).predict(x) - want).max() < archs.get(LITE0).parity_atol


@pytest.mark.torch
def test_lite0_init_from_its_run_folder_loads_every_weight(lite0_model):
    torch = _torch()
    from wbc_batch.training.export import load_run

    run, _ = lite0_model
    model, done = _init_lite0(run, run, np.zeros((1, 96, 128, 3), np.uint8))
    assert done["kind"] == "run" and done["rebuilt_batch_norms"] == 0
    trained, _, _ = load_run(run)
    a, b = model.net.state_dict(), trained.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
