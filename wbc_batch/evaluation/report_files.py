"""The report's files other than report.html, each written from a :class:`ReportData`.

review.csv is the exception: it holds every low-confidence row, so the scan writes it while
it reads the CSV (see :mod:`.report_scan`). matplotlib draws the PNGs and is imported only here,
only when it is installed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..csv_safety import CsvWriter
from ..inference.predictions import ENCODING_ERRORS
from .report_data import ReportData


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _writer(path: Path):
    return open(path, "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="")


def write_per_class(data: ReportData, path: Path) -> Path:
    with _writer(path) as f:
        w = CsvWriter(f)
        w.writerow(["label", "precision", "recall", "f1", "support", "predicted", "predicted_percent", "mean_confidence"])
        for r in data.classes:
            scores = [f"{r.precision:.6f}", f"{r.recall:.6f}", f"{r.f1:.6f}", r.support] if data.has_truth else ["", "", "", ""]
            mean = "" if r.mean_confidence is None else f"{r.mean_confidence:.6f}"
            w.writerow([r.label, *scores, r.predicted, f"{r.share:.4f}", mean])
    return path


def write_differential(data: ReportData, path: Path) -> Path:
    """One row per group: predicted counts and percents, errors, low confidence; then true counts and accuracy (empty without truth);
    with corrections, the verified counts and percents last."""
    labels, v = data.labels, data.verified
    with _writer(path) as f:
        w = CsvWriter(f)
        head = ["group", "n", "ok", *[f"count_{lb}" for lb in labels], *[f"pct_{lb}" for lb in labels], "errors", "low_confidence"]
        head += ["with_truth", *[f"true_count_{lb}" for lb in labels], "correct", "accuracy"]
        if v is not None:
            head += ["verified_reviewed", "verified_changed", "verified_excluded", "verified_n",
                     *[f"verified_count_{lb}" for lb in labels], *[f"verified_pct_{lb}" for lb in labels]]
        w.writerow(head)
        for g in data.groups or []:
            truth = [g.with_truth, *g.true, g.correct, f"{g.accuracy:.4f}"] if g.with_truth else [0, *[""] * len(labels), "", ""]
            row = [g.name, g.n, g.ok, *g.predicted, *[f"{p:.2f}" for p in g.percent], g.errors, g.low, *truth]
            if v is not None:
                t = v.groups[g.name]
                row += [t.reviewed, t.changed, t.excluded, t.n, *t.counts, *[f"{p:.2f}" for p in t.percent]]
            w.writerow(row)
    return path


def write_confusion_figures(data: ReportData, out: Path) -> dict[str, Path]:
    """Both confusion matrices as PNGs (needs matplotlib and truth)."""
    from .plots import plot_confusion

    cm = np.asarray(data.confusion, dtype=np.int64)
    paths = {"confusion_matrix": out / "confusion_matrix.png", "confusion_matrix_normalized": out / "confusion_matrix_normalized.png"}
    plot_confusion(cm, data.labels, paths["confusion_matrix"])
    plot_confusion(cm, data.labels, paths["confusion_matrix_normalized"], normalized=True)
    return paths


def find_curves(run_dir: Path, out: Path, plots: bool, warn: Callable[[str], None]) -> Path | None:
    """The run's curves.png, else one drawn from its history.csv (with matplotlib); None with a warning otherwise."""
    if (run_dir / "curves.png").is_file():
        return run_dir / "curves.png"
    history = run_dir / "history.csv"
    if not history.is_file():
        warn(f"no curves.png or history.csv in {run_dir}: no training curves")
        return None
    if not plots:
        warn(f"{run_dir} has no curves.png, and drawing one from its history.csv needs matplotlib: no training curves")
        return None
    from .plots import plot_history

    try:
        plot_history(history, out / "training_curves.png")
    except (ValueError, KeyError, OSError) as e:
        warn(f"cannot draw the training curves from {history}: {e}")
        return None
    return out / "training_curves.png"


def write_metrics(data: ReportData, paths: dict[str, Path], out: Path) -> Path:
    """metrics.json, with the names of the report's other files."""
    path = out / "metrics.json"
    files = paths | {"metrics": path}
    data.metrics["files"] = {kind: p.name if p.parent == out else str(p) for kind, p in files.items()} | {"html": "report.html"}
    path.write_text(json.dumps(data.metrics, indent=2, default=str), encoding="utf-8")
    return path


def png_uri(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
