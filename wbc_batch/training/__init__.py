"""Training: class folders to a trained network, exported to ONNX with its metadata, optionally INT8.

Dependency rule: the only package that imports torch (the ``train`` extra); it may import
:mod:`wbc_batch.inference`, :mod:`wbc_batch.evaluation` and :mod:`wbc_batch.modelfile` (which
calibrates and quantises what export builds), none of which imports it back.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "TrainConfig": ".config",
    "TrainResult": ".loop",
    "train": ".loop",
    "train_one_epoch": ".loop",
    "validate": ".loop",
    "RunRecord": ".record",
    "load_weights": ".record",
    "scan_class_folders": ".data",
    "build": ".models",
    "build_deployable": ".models",
    "export_model": ".export",
    "export_run": ".export",
    "load_run": ".export",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
