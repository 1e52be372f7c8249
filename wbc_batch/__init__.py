"""wbc-batch: classify white blood cells in microscope images with ONNX models.

The package shows its dependency rule in its layout:

* :mod:`wbc_batch.inference`: decode, run an ONNX model, write the CSV (onnxruntime, numpy, Pillow; never torch);
* :mod:`wbc_batch.evaluation`: metrics, plots and the report, from a predictions CSV (imports inference only);
* :mod:`wbc_batch.training`: train, export and quantise (torch; imports both of the above);
* :mod:`wbc_batch.cli`: the ``wbc-batch`` command, a thin layer over the three.

``wbc_batch.classify(inputs, model=path)`` yields one prediction per file (``engine=`` chooses where the batches
run: worker processes here by default, or a ``RayEngine``). Public names are resolved on first use (PEP 562), so
``import wbc_batch`` stays instant.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

#: Public names loaded on first access, and the module that defines each.
_LAZY = {
    "classify": ".inference.orchestrator",
    "load_model": ".inference.model",
    "run_classify": ".inference.orchestrator",
    "ClassifyConfig": ".inference.orchestrator",
    "RunnerOptions": ".inference.engine",
    "write_report": ".evaluation.report",
    "compute_metrics": ".evaluation.metrics",
}

__all__ = ["__version__", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
