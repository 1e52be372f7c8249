"""Torch side: data split, the seed CNN's exact structure, a real short training run, export parity,
and the exported model reloaded by classify. Runs in the `train` tox env (marker `torch`)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from adabn_reference import remeasured_outputs
from conftest import SAMPLE, SHARED_DATA, needs_shared_data

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from wbc_batch.inference.preprocess import PreprocessSpec, load_image  # noqa: E402
from wbc_batch.training.data import decode_all, group_split, read_group_file, scan_class_folders  # noqa: E402
from wbc_batch.training.models import CellCrop, Deployable, build  # noqa: E402
from wbc_batch.training.nets import SeedCNN, WbcNet  # noqa: E402


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


def _write_groups(path: Path, rows: list[tuple[str, str]], header: str = "path,group") -> Path:
    path.write_text(header + "\n" + "".join(f"{p},{g}\n" for p, g in rows), encoding="utf-8")
    return path


def test_groups_file_keeps_a_slide_whole_across_classes(tmp_path):
    rel = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.glob("*/*.jpeg"))
    # Ten "slides", each holding cells of several classes.
    gfile = _write_groups(tmp_path / "groups.csv", [(p, f"slide{i % 10}") for i, p in enumerate(rel)])
    files = scan_class_folders(SAMPLE, group_map=read_group_file(gfile))
    assert sorted(set(files.groups)) == [f"slide{i}" for i in range(10)]
    tr, va = group_split(files.targets, files.groups, 0.3, seed=0)
    g = np.asarray(files.groups)
    assert len(va) and not set(g[tr]) & set(g[va])


def test_groups_file_errors_are_clear(tmp_path):
    rel = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.glob("*/*.jpeg"))
    partial = _write_groups(tmp_path / "partial.csv", [(p, "a") for p in rel[:-2]])
    with pytest.raises(ValueError, match=r"2 of 40 images have no group in the groups file"):
        scan_class_folders(SAMPLE, group_map=read_group_file(partial))
    with pytest.raises(ValueError, match="needs a header with 'path' and 'group'"):
        read_group_file(_write_groups(tmp_path / "bad.csv", [(rel[0], "a")], header="file,slide"))
    with pytest.raises(ValueError, match="line 2: empty path or group"):
        read_group_file(_write_groups(tmp_path / "empty.csv", [(rel[0], "")]))
    (tmp_path / "latin1.csv").write_bytes(b"path,group\n\xe9,a\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_group_file(tmp_path / "latin1.csv")


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


def _field_with_cell(cell_xy: tuple[int, int], platelet_xy: tuple[int, int] = (40, 40)) -> torch.Tensor:
    """A pale 240x320 field with a purple 'nucleus' (radius 30) and a small purple 'platelet' (radius 4)."""
    yy, xx = torch.meshgrid(torch.arange(240.0), torch.arange(320.0), indexing="ij")
    img = torch.tensor([230.0, 200.0, 205.0]).view(3, 1, 1).expand(3, 240, 320).clone()
    for (cx, cy), r in ((cell_xy, 30), (platelet_xy, 4)):
        disk = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
        img[:, disk] = torch.tensor([90.0, 60.0, 190.0]).view(3, 1)
    return img[None]


def test_cell_crop_finds_the_nucleus_not_the_platelet():
    crop = CellCrop(160, 128)
    x = torch.cat([_field_with_cell((200, 90)), _field_with_cell((60, 200), platelet_xy=(280, 30))])
    c = crop.centres(x)
    assert torch.all((c - torch.tensor([[200.0, 90.0], [60.0, 200.0]])).abs() <= CellCrop.stride)


def _disk_field(r: int, cx: int = 160, cy: int = 120, dark_corner: bool = False) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(240.0), torch.arange(320.0), indexing="ij")
    img = torch.tensor([230.0, 200.0, 205.0]).view(3, 1, 1).expand(3, 240, 320).clone()
    img[:, (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r] = torch.tensor([90.0, 60.0, 190.0]).view(3, 1)
    if dark_corner:  # a rotation border with JPEG-like ringing: near black, never stain
        img[:, :80, :100] = torch.randint(0, 18, (3, 80, 100)).float()
    return img[None]


def test_follow_crop_window_follows_the_nucleus_size():
    crop = CellCrop(160, 128, follow=True)
    c, w = crop.locate(torch.cat([_disk_field(20), _disk_field(40), _disk_field(40, dark_corner=True)]))
    # inside the nucleus (a disk wider than the 36-px smoothing box has a plateau of equal scores)
    assert torch.all((c - torch.tensor([160.0, 120.0])).norm(dim=1) <= torch.tensor([CellCrop.stride * 1.5, 20, 20]))
    # equivalent-disc diameter 40 and 80 px -> windows 160 * 40 / 80 and 160 * 80 / 80, up to the 4-px pooling
    assert abs(w[0].item() - 80) <= 10 and abs(w[1].item() - 160) <= 10 and w[2].item() == w[1].item()
    fixed = CellCrop(160, 128).locate(_disk_field(20))[1]
    assert fixed.tolist() == [160.0]


def _band_field(length: int, height: int) -> torch.Tensor:
    """A nucleus as a horizontal band (the lobes of a neutrophil in a row), centred in a 240x320 field."""
    img = torch.tensor([230.0, 200.0, 205.0]).view(3, 1, 1).expand(3, 240, 320).clone()
    img[:, 120 - height // 2 : 120 + height // 2, 160 - length // 2 : 160 + length // 2] = torch.tensor([90.0, 60.0, 190.0]).view(3, 1, 1)
    return img[None]


def test_follow_crop_window_grows_with_a_nucleus_larger_than_the_nominal_window():
    """The same lobed nucleus (a band whose strongest point is near one end) at 1x to 4x: the window follows it.

    A box of half the nominal window around that point clipped it: 87, 143, 184 and 202 px for 1x-4x.
    """
    crop = CellCrop(160, 128, follow=True)
    _, w = crop.locate(torch.cat([_band_field(60 * k, 20 * k) for k in (1, 2, 3, 4)]))
    # equivalent-disc diameter of the band: 2 sqrt(area / pi); the window is 160 / 80 of it; 1x reads 4-px pooling high
    expect = [2 * 2 * (1200 * k * k / math.pi) ** 0.5 for k in (1, 2, 3, 4)]
    assert [round(v) for v in w.tolist()] == [87, 156, 244, 305]
    assert all(abs(a - b) / b <= 0.11 for a, b in zip(w.tolist(), expect, strict=True)), (w.tolist(), expect)


def test_follow_crop_samples_a_window_of_the_given_side():
    x = torch.randint(0, 256, (1, 3, 240, 320)).float()
    crop = CellCrop(64, 64, follow=True)
    out = crop.sample(x, torch.tensor([[202.0, 90.0]]), torch.tensor([64.0]))
    assert torch.allclose(out[0], x[0, :, 58:122, 170:234], atol=0.02)  # side 64 sampled to 64: a copy


def test_cell_crop_at_native_scale_copies_pixels_and_pads_with_zeros():
    x = torch.randint(0, 256, (2, 3, 240, 320)).float()
    crop = CellCrop(64, 64)
    out = crop.sample(x, torch.tensor([[202.0, 90.0], [10.0, 230.0]]))
    assert out.shape == (2, 3, 64, 64)
    # Bilinear weights at exact pixel centres: a copy up to float rounding of the grid (well under a grey level).
    assert torch.allclose(out[0], x[0, :, 58:122, 170:234], atol=0.02)
    # Window x 10-32..10+32, y 230-32..230+32: only x 0..42, y 198..240 lie inside the field.
    assert torch.allclose(out[1, :, :42, 22:], x[1, :, 198:, :42], atol=0.02)
    assert out[1, :, 42:, :].abs().max() < 0.02 and out[1, :, :, :22].abs().max() < 0.02


def test_cell_crop_centres_on_stained_cells_in_real_images():
    crop = CellCrop(160, 128)
    paths = sorted(SAMPLE.glob("*/*.jpeg"))
    x = torch.from_numpy(np.stack([load_image(p, PreprocessSpec(240, 320)) for p in paths])).permute(0, 3, 1, 2).float()
    for img, (cx, cy) in zip(x, crop.centres(x).long().tolist(), strict=True):
        patch = img[:, max(cy - 8, 0) : cy + 8, max(cx - 8, 0) : cx + 8]
        # Blue well above red at the centre (nucleus stain); the field on average is red-dominated.
        assert float((patch[2] - patch[0]).mean()) > 20 > float((img[2] - img[0]).mean())


def test_deployable_with_crop_feeds_the_network_the_window():
    torch.manual_seed(0)
    net = WbcNet(4, (48, 48))
    m = Deployable(net, crop=CellCrop(96, 48)).eval()
    x = torch.randint(0, 256, (2, 120, 160, 3), dtype=torch.uint8)
    with torch.inference_mode():
        p = m(x)
        xf = x.permute(0, 3, 1, 2).float()
        ref = torch.softmax(net(m.crop(xf) * m.scale - m.shift), 1)
    assert p.shape == (2, 4) and torch.allclose(p, ref, atol=1e-6)


def _tiny_config(run, **kw):
    from wbc_batch.training.loop import TrainConfig

    base = dict(arch="wbc-net", size=(48, 64), crop=(0, 0), epochs=2, batch_size=8, val_fraction=0.3, patience=0, workers=1, threads=2)
    return TrainConfig(str(SAMPLE), str(run), **{**base, **kw})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from wbc_batch.training.loop import train

    run = tmp_path_factory.mktemp("run")
    res = train(_tiny_config(run), progress=False)
    assert res.epochs_run == 2
    return run


def test_crop_flags_each_fill_in_the_other_from_the_architecture_default():
    # --crop-size alone used to be dropped (the crop stayed 160 -> 128) without a word.
    from wbc_batch.cli.train import crop_option
    from wbc_batch.training.config import TrainConfig

    assert crop_option(None, None) is None
    cfg = TrainConfig("d", "r", arch="wbc-net")
    assert replace(cfg, crop=crop_option(None, 112)).resolved_crop() == (160, 112)
    assert replace(cfg, crop=crop_option(200, None)).resolved_crop() == (200, 128)
    assert replace(cfg, crop=crop_option(0, None)).with_crop().crop == (0, 128) and replace(cfg, crop=(0, None)).resolved_crop() is None
    assert replace(cfg, crop=(200, None)).with_crop((150, 96)).crop == (200, 96)  # --init's crop fills the part not given
    assert cfg.with_crop((150, 96)).crop == (150, 96) and cfg.with_crop().crop is None


def test_the_default_networks_crop_the_cell_from_the_native_field():
    from wbc_batch.training.loop import TrainConfig

    cfg = TrainConfig("d", "r", arch="wbc-net")
    assert cfg.resolved_crop() == (160, 128) and cfg.resolved_size() == (240, 320) and cfg.net_input_size() == (128, 128)
    lite = TrainConfig("d", "r")  # the default network, efficientnet-lite0
    assert lite.resolved_crop() == (160, 112) and lite.resolved_size() == (240, 320) and lite.net_input_size() == (112, 112)
    seed = TrainConfig("d", "r", arch="seed-cnn")
    assert seed.resolved_crop() is None and seed.resolved_size() == (60, 80)


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
    from wbc_batch.training.loop import train

    train(_tiny_config(tmp_path), progress=False)
    a = torch.load(tiny_run / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "last.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_parity_and_reload_by_classify(tiny_run, tmp_path):
    import onnx

    from wbc_batch import RunnerOptions, classify
    from wbc_batch.inference.model import load_model
    from wbc_batch.training.export import PARITY_ATOL, export_run, load_run

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
    assert [p.label for p in preds] == [cfg.classes[i] for i in ref.argmax(1)]


def test_cell_crop_run_exports_with_parity(tmp_path):
    import onnx

    from wbc_batch import RunnerOptions, classify
    from wbc_batch.inference.model import load_model
    from wbc_batch.training.export import PARITY_ATOL, export_run
    from wbc_batch.training.loop import train

    run = tmp_path / "run"
    train(_tiny_config(run, size=(120, 160), crop=(80, 40), epochs=1), progress=False)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["size"] == [120, 160] and cfg["crop"] == [80, 40]
    out = tmp_path / "crop.onnx"
    rep = export_run(run, out, check_dir=SAMPLE, check_images=40)
    assert rep.argmax_agreement == 1.0 and rep.max_abs_diff_all <= PARITY_ATOL
    proto = onnx.load(str(out))
    assert {"GridSample", "ArgMax"} <= {n.op_type for n in proto.graph.node}
    assert load_model(out).metadata.extra["training"]["config"]["crop"] == [80, 40]
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["N", 120, 160, 3]
    preds = list(classify([SAMPLE], out, options=RunnerOptions(workers=1)))
    assert len(preds) == 40 and all(p.status == "ok" for p in preds)


def test_build_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        build("resnet-9000", 4, (60, 80))


def test_keep_aspect_and_follow_crop_travel_in_the_model_and_classify_uses_them(tmp_path):
    """A run with the v2 defaults (aspect-keeping decode, nucleus-following crop): the exported file
    says so, the graph holds the follow crop, and classify decodes a square crop as training did."""
    from PIL import Image

    from wbc_batch import RunnerOptions, classify
    from wbc_batch.inference.model import load_model
    from wbc_batch.training.export import export_run, load_run
    from wbc_batch.training.loop import train

    run = tmp_path / "run"
    train(_tiny_config(run, size=(120, 160), crop=(80, 40), epochs=1), progress=False)
    out = tmp_path / "v2.onnx"
    export_run(run, out, check_dir=SAMPLE, check_images=40)
    md = load_model(out).metadata
    assert md.keep_aspect and md.preprocess.keep_aspect
    cfg = md.extra["training"]["config"]
    assert cfg["keep_aspect"] is True and cfg["crop_follow"] is True and cfg["colour"] == "wide"
    net, _, _ = load_run(run)
    assert net.crop.follow
    # A single-cell crop (square): padded, not stretched, by classify exactly as the torch model sees it.
    sq = tmp_path / "in" / "cell.png"
    sq.parent.mkdir()
    Image.open(SAMPLE / "NEUTROPHIL" / "_0_1469.jpeg").crop((100, 60, 220, 180)).save(sq)
    (pred,) = classify([sq.parent], out, options=RunnerOptions(workers=1))
    x = load_image(sq, PreprocessSpec(120, 160, keep_aspect=True))
    assert x[:, :20].max() == 0 and x[:, 140:].max() == 0  # 120x120 fitted into 160 wide: 20 px of black each side
    with torch.inference_mode():
        ref = net(torch.from_numpy(x[None])).numpy()[0]
    assert np.abs(np.asarray(pred.probabilities) - ref).max() < 1e-5


def test_background_balance_maps_a_tinted_background_to_the_reference():
    from wbc_batch.inference.preprocess import PreprocessSpec, load_image
    from wbc_batch.training.models import BackgroundBalance

    spec = PreprocessSpec(240, 320, keep_aspect=True)
    x = torch.from_numpy(np.stack([load_image(p, spec) for p in sorted(SAMPLE.rglob("*.jpeg"))[:4]])).permute(0, 3, 1, 2).float()
    bal = BackgroundBalance((200.0, 210.0, 220.0))
    ref_bright = BackgroundBalance.brightest(bal(x))
    assert torch.allclose(ref_bright.flatten(1), torch.tensor([[200.0, 210.0, 220.0]]).expand(4, 3), atol=0.5)
    yellow = x * torch.tensor([1.0, 0.97, 0.75]).view(1, 3, 1, 1)  # a yellow-toned lamp
    assert (bal(yellow) - bal(x)).abs().mean() < 1.0  # the tint is divided out
    padded = x.clone()
    padded[..., :80] = 0  # aspect-keeping padding: never the background
    assert torch.allclose(BackgroundBalance.brightest(padded), BackgroundBalance.brightest(x[..., 80:]))


def test_adapt_refolds_what_torch_batch_norm_measures(tiny_run, tmp_path):
    """The ONNX-side refold (no torch) gives what the torch network gives with its batch norms re-measured (AdaBN)."""
    from wbc_batch.inference.model import load_model
    from wbc_batch.modelfile.adapt import adapt_model
    from wbc_batch.training.export import export_run, load_run

    out, ad = tmp_path / "tiny.onnx", tmp_path / "tiny-adapted.onnx"
    export_run(tiny_run, out, check_dir=SAMPLE, check_images=40)
    adapt_model(out, [SAMPLE], ad)
    paths = sorted(str(p) for p in SAMPLE.rglob("*.jpeg"))
    model, _, _ = load_run(tiny_run)
    x = torch.from_numpy(np.stack([load_image(p, PreprocessSpec(48, 64)) for p in paths]))
    want = remeasured_outputs(model, x)  # one batch of all 40 images, each layer measured on the layers before it
    got = load_model(ad).predict(x.numpy())
    assert np.abs(got - want).max() < 1e-4
    assert not np.allclose(load_model(out).predict(x.numpy()), want, atol=1e-3)  # adapting changed the outputs
