"""What a training run prints and draws: plain lines in a log, a bar only on a terminal, visible one-epoch curves."""

from __future__ import annotations

import csv
import io
import sys

import pytest
from conftest import SAMPLE

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from wbc_batch.training.config import TrainConfig  # noqa: E402
from wbc_batch.training.loop import train  # noqa: E402


def _two_class_set(root, per_class: int = 4):
    """2 classes x ``per_class`` real images (symlinks into sample_data)."""
    for cls in ("LYMPHOCYTE", "NEUTROPHIL"):
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.jpeg"))[:per_class]:
            (root / cls / p.name).symlink_to(p)
    return root


def _tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(arch="wbc-net", size=(24, 32), crop=(0, 0), epochs=1, batch_size=4, val_fraction=0.5, patience=0, workers=1, threads=1)
    return TrainConfig(str(_two_class_set(tmp_path / "data")), str(tmp_path / "run"), **{**base, **kw})


def test_log_output_is_one_plain_line_per_epoch(tmp_path, capsys):
    train(_tiny(tmp_path, epochs=2), progress=True)  # progress asked for, but stderr is captured: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 2 and len(lines) == 3 and lines[0].startswith("data: 8 images")
    for n, ln in enumerate(epochs, 1):
        assert ln.startswith(f"epoch   {n}  train loss ") and " acc " in ln and " macro-F1 " in ln and ln.rstrip(" *").endswith("s")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_during_each_epoch(tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    train(_tiny(tmp_path), progress=True)
    assert "\r" in term.getvalue() and "epoch 1/1" in term.getvalue()


def test_one_epoch_curves_show_a_point_per_curve(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.lines import Line2D

    from wbc_batch.evaluation.plots import history_figure

    run = tmp_path / "run"
    train(_tiny(tmp_path), progress=False)
    assert (run / "curves.png").is_file()
    with open(run / "history.csv", newline="") as f:
        fig = history_figure(list(csv.DictReader(f)))
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    assert len(lines) == 5 and all(isinstance(ln, Line2D) for ln in lines)
    for ln in lines:
        assert ln.get_marker() == "o" and ln.get_markersize() > 0 and list(ln.get_xdata()) == [1.0]


def test_precise_bn_replaces_running_averages_by_the_mean_over_fresh_batches(tmp_path):
    import numpy as np
    from torch import nn

    from wbc_batch.inference.preprocess import PreprocessSpec
    from wbc_batch.training.loop import _trainer, build_deployable, load_data, precise_bn

    cfg = _tiny(tmp_path, augment=False)
    data = load_data(cfg, PreprocessSpec(24, 32))
    model = build_deployable(cfg.arch, 2, (24, 32), None, probabilities=False)
    t = _trainer(cfg, model, data, torch.device("cpu"))
    first = next(m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d))
    precise_bn(t, data, batch_size=1, batches=3, gen=torch.Generator().manual_seed(0))
    assert int(first.num_batches_tracked) == 3 and first.momentum == 0.1  # recomputed, and the momentum restored
    # no augmentation: each batch is one train image; the first BN's mean is their conv output's mean
    x = torch.from_numpy(data.images[data.train_idx]).permute(0, 3, 1, 2).float() * model.scale - model.shift
    conv = model.net.features[0][0] if hasattr(model.net, "features") else next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    per_image = conv(x).detach().mean(dim=(2, 3))
    lo, hi = per_image.min(0).values, per_image.max(0).values
    assert torch.all((first.running_mean >= lo - 1e-4) & (first.running_mean <= hi + 1e-4))
    assert not np.allclose(first.running_var.numpy(), 1.0)  # no longer the reset value


def test_precise_bn_takes_at_most_one_pass_over_the_training_images(tmp_path):
    """Asked for 20 batches of 4 with 4 training images: one batch (the same images 20 times add nothing but time)."""
    from torch import nn

    from wbc_batch.inference.preprocess import PreprocessSpec
    from wbc_batch.training.loop import _trainer, build_deployable, load_data, precise_bn

    cfg = _tiny(tmp_path)
    data = load_data(cfg, PreprocessSpec(24, 32))
    model = build_deployable(cfg.arch, 2, (24, 32), None, probabilities=False)
    t = _trainer(cfg, model, data, torch.device("cpu"))
    batches: list[int] = []
    model.net.register_forward_hook(lambda _m, args, _out: batches.append(len(args[0])))
    first = next(m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(data.train_idx) == 4
    for batch_size, asked, expected in ((4, 20, [4]), (8, 20, [4]), (3, 20, [3]), (2, 20, [2, 2]), (2, 1, [2]), (1, 3, [1, 1, 1])):
        batches.clear()
        precise_bn(t, data, batch_size=batch_size, batches=asked, gen=torch.Generator().manual_seed(0))
        assert batches == expected, (batch_size, asked)
        assert int(first.num_batches_tracked) == len(expected)
