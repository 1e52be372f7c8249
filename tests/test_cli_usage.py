"""What a new user reads: install hints, warnings, the model card, model names and report folders."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner
from conftest import SAMPLE

from wbc_batch.cli import main

CPU_TORCH = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(("command", "absent", "hint"), [
    (["adapt", "M", SAMPLE, "-o", "x.onnx"], "onnx", "adapt needs onnx (not torch): pip install onnx"),
    (["calibrate", "M", "--reference-dir", SAMPLE, "-o", "x.onnx"], "onnx", "calibrate needs onnx (not torch): pip install onnx"),
    (["train", SAMPLE], "torch", "train and export need torch (the train extra): pip install '.[train]' in the wbc-batch checkout "
                                 f"(on a machine without a GPU, first {CPU_TORCH})"),
    (["export", SAMPLE], "torch", "train and export need torch (the train extra): pip install '.[train]' in the wbc-batch checkout "
                                  f"(on a machine without a GPU, first {CPU_TORCH})"),
])
def test_a_missing_package_names_the_smallest_install_that_works(monkeypatch, color_model, command, absent, hint):
    monkeypatch.setitem(sys.modules, absent, None)  # import fails as where the package is not installed
    r = run(*[color_model if a == "M" else a for a in command])
    assert (r.exit_code, r.stderr) == (2, f"wbc-batch: error: {hint}\n")


def test_the_ray_hint_names_ray_itself(monkeypatch, color_model, tmp_path):
    from wbc_batch.inference import ray_engine

    monkeypatch.setattr(ray_engine, "ray", None)
    r = run("classify", SAMPLE, "-m", color_model, "-o", tmp_path / "p.csv", "--engine", "ray")
    assert (r.exit_code, r.stderr) == (2, "wbc-batch: error: --engine ray needs Ray: pip install 'ray[data]'\n")
