"""Inference: find images, decode them, run an ONNX model, write one CSV row per file.

Dependency rule: this package imports onnxruntime, numpy and Pillow, never torch, and nothing
from :mod:`wbc_batch.evaluation` or :mod:`wbc_batch.training` (a test enforces it).

Modules: ``discover`` (which files), ``preprocess`` (the one decode path), ``metadata`` (the
contract a model file carries), ``model`` (an onnxruntime session checked against it),
``rows`` (the row type engines produce), ``predictions`` (the CSV's columns, its writer and readers, the sidecar),
``truth`` (labels from folders or a CSV), ``engine`` (the interface every engine implements and
the batch they all execute), ``local_engine`` and ``ray_engine`` (execute batches: processes
here, or Ray actors), ``isolation`` (what a worker that dies means for the rows, for both engines),
``pool`` (the local worker processes: started from the model's bytes,
replaced when one dies, never outliving the run), ``orchestrator`` (decides what a run does: files,
truth, output safety, resume, progress, summary; also the ``classify()`` API), ``output_guard``
(one run per output: its lock; never an input as the output) and ``signals`` (the first
SIGINT/SIGTERM stops a run cleanly, later ones cannot cut its cleanup short).
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
    "Prediction": ".rows",
    "OutputError": ".predictions",
    "read_sidecar": ".predictions",
    "folder_truth": ".truth",
    "read_labels_csv": ".truth",
    "LabelsError": ".truth",
    "truth_function": ".truth",
    "Engine": ".engine",
    "RunnerOptions": ".engine",
    "LocalEngine": ".local_engine",
    "classify": ".orchestrator",
    "ClassifyConfig": ".orchestrator",
    "RunSummary": ".orchestrator",
    "run_classify": ".orchestrator",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
