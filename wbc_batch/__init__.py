"""wbc-batch: classify white blood cells in microscope images with ONNX models.

``wbc_batch.classify(inputs, model=path)`` yields one prediction per file. It (and
``load_model``) is resolved on first use (PEP 562), so ``import wbc_batch`` stays instant:
importing the runner eagerly would load numpy and Pillow for every ``wbc-batch --version``
and every ``wbc_batch.train`` import alike.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: Public names loaded on first access, and the module that defines each.
_LAZY = {"classify": "runner", "load_model": "model"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wbc_batch' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
