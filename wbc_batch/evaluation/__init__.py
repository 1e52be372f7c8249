"""Evaluation: metrics, plots and the report, read from a predictions CSV.

Dependency rule: imports :mod:`wbc_batch.inference` (CSV format, sidecar), never torch and nothing
from :mod:`wbc_batch.training`. matplotlib (the ``report`` extra) is optional.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "Metrics": ".metrics",
    "ClassMetrics": ".metrics",
    "compute_metrics": ".metrics",
    "compute_metrics_from_names": ".metrics",
    "confusion_matrix": ".metrics",
    "evaluate_model": ".evaluate",
    "metrics_of": ".evaluate",
    "predict_dir": ".evaluate",
    "plot_confusion": ".plots",
    "plot_history": ".plots",
    "write_report": ".report",
    "ReportError": ".report",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
