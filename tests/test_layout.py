"""The dependency rule the package layout shows: inference, evaluation and modelfile never import torch;
inference imports none of the others, evaluation neither modelfile nor training, modelfile neither training
nor the CLI. Each module is imported in a fresh interpreter so that nothing another test loaded can hide
an import; modelfile's source is also read for imports inside functions, which run only when called."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import wbc_batch
import wbc_batch.evaluation
import wbc_batch.inference
import wbc_batch.modelfile

TORCH = ("torch", "torchvision")

PROBE = (
    "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') or m.startswith('wbc_batch.'))))"
)


def _modules(package) -> list[str]:
    return sorted(f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__))


def _loaded_by(module: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


#: What each torch-free package may not load, besides torch.
FORBIDDEN = {
    "wbc_batch.inference": ("wbc_batch.evaluation", "wbc_batch.modelfile", "wbc_batch.training", "wbc_batch.cli"),
    "wbc_batch.evaluation": ("wbc_batch.modelfile", "wbc_batch.training", "wbc_batch.cli"),
    "wbc_batch.modelfile": ("wbc_batch.training", "wbc_batch.cli"),
}


@pytest.mark.parametrize("module", [*_modules(wbc_batch.inference), *_modules(wbc_batch.evaluation), *_modules(wbc_batch.modelfile)])
def test_torch_free_packages_never_import_torch(module: str) -> None:
    loaded = _loaded_by(module)
    assert not [m for m in loaded if m.split(".")[0] in TORCH], module
    package = module.rsplit(".", 1)[0]
    assert not [m for m in loaded if m.startswith(FORBIDDEN[package])], module


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (inside functions too), relative imports resolved to wbc_batch names."""
    package = "wbc_batch." + path.parent.name
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            name = ".".join(p for p in (base, node.module) if p)
            out += [name] if node.module else [f"{name}.{a.name}" for a in node.names]
    return out


@pytest.mark.parametrize("path", sorted(Path(wbc_batch.modelfile.__file__).parent.glob("*.py")), ids=lambda p: p.name)
def test_modelfile_imports_no_torch_even_when_a_function_runs(path: Path) -> None:
    # the calibrate and adapt commands tell a user to install onnx, not torch: no import of theirs may need more
    names = _imports(path)
    assert names, path
    assert not [n for n in names if n.split(".")[0] in TORCH or n.startswith(FORBIDDEN["wbc_batch.modelfile"])], path


def test_layout_lists_the_modules_it_claims() -> None:
    # the probe above must see real modules, or the rule is checked on nothing
    assert "wbc_batch.inference.local_engine" in _modules(wbc_batch.inference)
    assert "wbc_batch.evaluation.report" in _modules(wbc_batch.evaluation)
    assert {"wbc_batch.modelfile.trust", "wbc_batch.modelfile.calibrate", "wbc_batch.modelfile.adapt", "wbc_batch.modelfile.quantize",
            "wbc_batch.modelfile.proto"} <= set(_modules(wbc_batch.modelfile))
    # and the source reader resolves relative imports, or the function-level check reads nothing
    assert {"wbc_batch.modelfile.images", "wbc_batch.inference.model", "wbc_batch.evaluation.evaluate", "onnx"} <= set(
        _imports(Path(wbc_batch.modelfile.__file__).parent / "quantize.py"))


def test_import_wbc_batch_loads_no_heavy_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, wbc_batch; print(sorted(m for m in ('numpy','PIL','onnxruntime','torch') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == "[]"


def test_every_command_on_a_model_file_gives_the_onnx_hint() -> None:
    # a command that imports modelfile and not training needs onnx only: it says so before it imports it
    cli = Path(wbc_batch.__file__).parent / "cli"
    users = {p.name for p in cli.glob("*.py")
             if any(n.startswith("wbc_batch.modelfile") for n in _imports(p)) and not any(n.startswith("wbc_batch.training") for n in _imports(p))}
    assert users == {"adapt.py", "calibrate.py"}
    for name in users:
        calls = [n.func.id for n in ast.walk(ast.parse((cli / name).read_text(encoding="utf-8")))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id.startswith("require")]
        assert calls == ["require_modelfile"], name


@pytest.mark.parametrize("package", ["wbc_batch", "wbc_batch.inference", "wbc_batch.evaluation", "wbc_batch.modelfile"])
def test_public_names_resolve(package: str) -> None:
    import importlib

    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"


def test_the_cli_starts_without_torch() -> None:
    # an inference-only install has no torch: the command and every --help must still load
    assert [m for m in _loaded_by("wbc_batch.cli") if m.split(".")[0] in TORCH] == []


def test_train_help_shows_the_config_defaults() -> None:
    from click.testing import CliRunner

    from wbc_batch.cli import main
    from wbc_batch.training.config import TrainConfig

    out = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    flat = " ".join(out.split())
    for flag, field in (("--lr", "lr"), ("--batch-size", "batch_size"), ("--patience", "patience")):
        assert f"[default: {getattr(TrainConfig, field)}]" in flat, flag
    # Epochs and the network are the registry's: each network's own epochs, read from one place.
    from wbc_batch.training import archs

    assert f"[default: the network's: {', '.join(f'{a.epochs} {a.name}' for a in archs.ARCHS.values())}]" in flat
    assert f"[default: {archs.DEFAULT_ARCH}; with --init, the network of the model it starts from]" in flat
