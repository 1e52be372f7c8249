"""Model files: read and rewrite an exported ONNX model without the network's training code.

What lives here edits a model file a lab was given, with no run folder: calibrated probabilities and
the domain check written into the graph (:mod:`.trust`, fitted by :mod:`.calibrate`), batch norms
re-measured on a lab's images (:mod:`.adapt`), static INT8 (:mod:`.quantize`), and the one way to read,
set and save the wbc-batch metadata of a proto (:mod:`.proto`). Export builds its file through the same
steps, in memory.

Dependency rule: numpy, onnx and onnxruntime, never torch (``pip install onnx`` on top of the inference
install); it may import :mod:`wbc_batch.inference` and :mod:`wbc_batch.evaluation`, never
:mod:`wbc_batch.training` or the CLI. ``tests/test_layout.py`` holds it to that.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "metadata_doc": ".proto",
    "set_metadata": ".proto",
    "save_checked": ".proto",
    "calibrate_model": ".calibrate",
    "calibrate_proto": ".calibrate",
    "adapt_model": ".adapt",
    "quantize_model": ".quantize",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
