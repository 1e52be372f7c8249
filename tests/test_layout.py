"""The dependency rule the package layout shows: inference and evaluation never import torch,
inference imports neither evaluation nor training. Each module is imported in a fresh interpreter
so that nothing another test loaded can hide an import."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import wbc_batch
import wbc_batch.evaluation
import wbc_batch.inference

PROBE = (
    "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') or m.startswith('wbc_batch.'))))"
)


def _modules(package) -> list[str]:
    return sorted(f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__))


def _loaded_by(module: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("module", [*_modules(wbc_batch.inference), *_modules(wbc_batch.evaluation)])
def test_inference_and_evaluation_never_import_torch(module: str) -> None:
    loaded = _loaded_by(module)
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "torchvision")], module
    if module.startswith("wbc_batch.inference."):
        assert not [m for m in loaded if m.startswith(("wbc_batch.evaluation", "wbc_batch.training"))], module


def test_layout_lists_the_modules_it_claims() -> None:
    # the probe above must see real modules, or the rule is checked on nothing
    assert "wbc_batch.inference.local_engine" in _modules(wbc_batch.inference)
    assert "wbc_batch.evaluation.report" in _modules(wbc_batch.evaluation)


def test_import_wbc_batch_loads_no_heavy_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, wbc_batch; print(sorted(m for m in ('numpy','PIL','onnxruntime','torch') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package", ["wbc_batch", "wbc_batch.inference", "wbc_batch.evaluation"])
def test_public_names_resolve(package: str) -> None:
    import importlib

    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"


def test_the_cli_starts_without_torch() -> None:
    # an inference-only install has no torch: the command and every --help must still load
    assert [m for m in _loaded_by("wbc_batch.cli") if m.split(".")[0] in ("torch", "torchvision")] == []


def test_train_help_shows_the_config_defaults() -> None:
    from click.testing import CliRunner

    from wbc_batch.cli import main
    from wbc_batch.training.config import TrainConfig

    out = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    flat = " ".join(out.split())
    for flag, field in (("--epochs", "epochs"), ("--lr", "lr"), ("--batch-size", "batch_size"), ("--patience", "patience")):
        assert f"[default: {getattr(TrainConfig, field)}]" in flat, flag
