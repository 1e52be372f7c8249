"""Inference: find images, decode them, run an ONNX model, write one CSV row per file.

Dependency rule: this package imports onnxruntime, numpy and Pillow, never torch, and nothing
from :mod:`wbc_batch.evaluation` or :mod:`wbc_batch.training` (a test enforces it).

Modules: ``discover`` (which files), ``preprocess`` (the one decode path), ``metadata`` (the
contract a model file carries), ``model`` (an onnxruntime session checked against it),
``predictions`` (CSV rows, the writer, the sidecar), ``truth`` (labels from folders or a CSV),
``local_engine`` and ``ray_engine`` (execute batches), ``orchestrator`` (a whole run: output
safety, resume, progress, summary).
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "iter_images": ".discover",
    "InputFile": ".discover",
    "load_image": ".preprocess",
    "ImageError": ".preprocess",
    "PreprocessSpec": ".preprocess",
    "ModelMetadata": ".metadata",
    "ModelError": ".metadata",
    "Model": ".model",
    "load_model": ".model",
    "default_model_path": ".model",
    "Prediction": ".predictions",
    "OutputError": ".predictions",
    "read_sidecar": ".predictions",
    "folder_truth": ".truth",
    "read_labels_csv": ".truth",
    "LabelsError": ".truth",
    "RunnerOptions": ".local_engine",
    "classify": ".local_engine",
    "iter_prediction_batches": ".local_engine",
    "ClassifyConfig": ".orchestrator",
    "RunSummary": ".orchestrator",
    "run_classify": ".orchestrator",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
