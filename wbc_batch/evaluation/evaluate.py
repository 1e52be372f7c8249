"""An ONNX model scored on a labelled class-folder set, through classify itself (no torch here).

Used by ``wbc-batch export --eval-dir`` (figures embedded in the model), by quantisation
(float vs INT8 from one classify pass each) and by the benchmarks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..inference.rows import Prediction
from .metrics import compute_metrics_from_names


def predict_dir(model_path: str | os.PathLike[str], data_dir: str | os.PathLike[str], workers: int = 0) -> tuple[tuple[str, ...], list[Prediction]]:
    """The model's labels and one :class:`Prediction` per file of ``data_dir`` (via classify)."""
    from ..inference.engine import RunnerOptions
    from ..inference.model import load_model
    from ..inference.orchestrator import classify

    opts = RunnerOptions(workers=workers)
    model = load_model(model_path, threads=opts.session_threads())
    return model.labels, list(classify([data_dir], model, options=opts))


def metrics_of(preds: Sequence[Prediction], labels: Sequence[str], eval_dir: str | os.PathLike[str]) -> dict:
    """Accuracy, F1 and confusion matrix of predictions that carry a true label."""
    scored = [p for p in preds if p.status == "ok" and p.true_label]
    m = compute_metrics_from_names([p.true_label for p in scored], [p.label for p in scored], labels).to_dict()
    m.update(eval_dir=str(eval_dir), errors=sum(p.status != "ok" for p in preds))
    return m


def evaluate_model(model_path: str | os.PathLike[str], eval_dir: str | os.PathLike[str], workers: int = 0) -> dict:
    """Accuracy, F1 and confusion matrix of an ONNX model on a labelled class-folder set."""
    labels, preds = predict_dir(model_path, eval_dir, workers)
    return metrics_of(preds, labels, eval_dir)
