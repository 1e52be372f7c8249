"""Evaluation report from a predictions CSV: metrics.json, per_class.csv, matrices, report.html.

Three steps, each in its own module: one streaming pass over the CSV (:mod:`.report_scan`,
memory does not grow with the number of rows), everything the report shows as data
(:mod:`.report_data`), then the outputs from that data: the CSV/JSON/PNG files
(:mod:`.report_files`) and report.html from a Jinja2 template (:mod:`.report_render`), with
the pictures of a bounded number of cells embedded (:mod:`.report_images`).

matplotlib (the ``report`` extra) draws the PNG figures and is imported only when they are
drawn. Without it the report is still written (numbers, tables, pictures, CSS bar charts)
and a warning says how to get the figures.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..inference.predictions import OutputError, read_sidecar
from .corrections import LabelRow, Verified, read_corrections
from .report_data import Cell, ReportData, build_report_data
from .report_files import (
    find_curves,
    matplotlib_available,
    png_uri,
    write_confusion_figures,
    write_differential,
    write_metrics,
    write_per_class,
)
from .report_images import CellImages, cell_images
from .report_render import MATPLOTLIB_HINT, render_html
from .report_scan import HIST_BINS, Group, ReportError, ReportLimits, Scan, csv_labels, group_key, scan, verified_of, write_review
from .report_trust import DEFAULT_REVIEW_SHARE, ReviewPolicy, build_trust

#: Predictions below this confidence are counted (and coloured in the histogram) as low confidence.
LOW_CONFIDENCE = 0.5

#: Every file a report may write into its folder (a test checks a full report writes exactly these).
REPORT_FILES = ("report.html", "metrics.json", "per_class.csv", "review.csv", "differential.csv",
                "confusion_matrix.png", "confusion_matrix_normalized.png", "training_curves.png")

#: The default caps on what the HTML shows (the CSVs hold everything); see :class:`ReportLimits`.
GALLERY_PER_PAIR = ReportLimits.gallery_per_pair
GALLERY_MAX = ReportLimits.gallery_max
REVIEW_MAX = ReportLimits.review_max
REVIEW_IMAGES = ReportLimits.review_images
FAILED_MAX = ReportLimits.failed_max
TOP_CONFUSIONS = ReportLimits.top_confusions

__all__ = [
    "FAILED_MAX",
    "GALLERY_MAX",
    "GALLERY_PER_PAIR",
    "HIST_BINS",
    "MATPLOTLIB_HINT",
    "REPORT_FILES",
    "REVIEW_IMAGES",
    "REVIEW_MAX",
    "TOP_CONFUSIONS",
    "DEFAULT_REVIEW_SHARE",
    "ReportData",
    "ReviewPolicy",
    "ReportError",
    "ReportLimits",
    "group_key",
    "matplotlib_available",
    "prepare_report_dir",
    "write_report",
]


def prepare_report_dir(out_dir: str | os.PathLike[str], *, replace: bool, clear: bool = True) -> None:
    """Refuse a report folder that holds files unless ``replace``; with it (and ``clear``) remove an earlier
    report's files, so no file of it (a differential the new report has no groups for) passes for the new one's.

    Why refuse: a folder given by mistake (one of a lab's own, or another run's report) must not be written
    into silently. Files a report never writes stay, even with ``replace``. ``clear=False`` checks only (before
    a classify run whose report comes at its end).
    """
    out = Path(out_dir)
    try:
        holds_files = out.is_dir() and any(out.iterdir())
    except OSError as e:
        raise OutputError(f"cannot read report folder {out}: {e.strerror or e}") from e
    if holds_files and not replace:
        raise OutputError(f"report folder {out} is not empty: give --overwrite to replace the report in it, or another folder")
    if holds_files and clear:
        try:
            for name in REPORT_FILES:
                (out / name).unlink(missing_ok=True)
        except OSError as e:
            raise OutputError(f"cannot replace the report in {out}: {e.strerror or e}") from e


def _stderr_warning(msg: str) -> None:
    print(f"wbc-batch: warning: {msg}", file=sys.stderr)


def _auto_group(groups: dict[str, Group], labels: Sequence[str]) -> bool:
    """Group by the first folder level when some of those folders are not class names."""
    upper = {lb.upper() for lb in labels}
    return any(g != "." and g.upper() not in upper for g in groups)


def _read_side(csv_path: Path, warn: Callable[[str], None]) -> dict:
    try:
        side = read_sidecar(csv_path) or {}
    except OutputError as e:
        warn(str(e))
        side = {}
    if not side:
        warn(f"no readable {csv_path.name}.run.json beside the CSV: model identity, input root and throughput are unknown")
    return side


def attach_images(d: ReportData, image_root: Path) -> None:
    """Read the pictures of every gallery cell and of the first ``review_images`` review rows (each file once)."""
    cache: dict[str, CellImages | None] = {}
    cells: list[Cell] = [c for pair in d.gallery for c in pair.cells] + d.review[: d.limits.review_images]
    for c in cells:
        if c.path not in cache:
            cache[c.path] = cell_images(image_root / c.path)
        c.images = cache[c.path]


@dataclass(frozen=True)
class _Job:
    """One report's inputs, checked once: where from and to, the group level, the review queue's rule."""

    csv_path: Path
    out: Path
    group_by: int | None  # as asked: None = decide from the folders, 0 = no differential
    policy: ReviewPolicy
    threshold: float  # below it a prediction counts as low confidence
    limits: ReportLimits
    warnings: list[str]
    on_warning: Callable[[str], None] | None

    @property
    def level(self) -> int:
        """The folder depth that names a row's group (computed for every row, shown only when the report groups)."""
        return self.group_by or 1

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if self.on_warning is not None:
            self.on_warning(msg)


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create report folder {out}: {e.strerror or e}") from e


def _check_scan(job: _Job, side: dict, s: Scan) -> None:
    """Warnings about what the scan found: labels the sidecar disagrees with, rows it skipped."""
    model_labels = (side.get("model") or {}).get("labels")
    if model_labels and list(model_labels) != s.labels:
        job.warn(f"the sidecar's model labels {model_labels} differ from the CSV's {s.labels}; the CSV's are used")
    if s.malformed:
        job.warn(f"{s.malformed} malformed row(s) skipped (a torn last line of an interrupted run, or an edited CSV)")


def _grouped(job: _Job, s: Scan) -> int | None:
    """The differential's group level, or None for no differential."""
    if job.group_by is None:
        return job.level if _auto_group(s.groups, s.labels) else None
    return job.group_by or None


def write_report(
    predictions_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    group_by: int | None = None,
    review_threshold: float | None = None,
    review_share: float | None = None,
    target_accuracy: float | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    on_warning: Callable[[str], None] | None = _stderr_warning,
    limits: ReportLimits | None = None,
    corrections: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Write the report files for ``predictions_csv`` into ``out_dir``; returns their paths by kind.

    ``group_by``: folder depth under the input root that makes one group (slide) of the
    differential; ``None`` = 1 when those first-level folders are not class names, else no
    differential; 0 = no differential. The review queue (review.csv and the HTML list, riskiest
    first) is one of: the ``review_share`` riskiest predictions (default 10%); the smallest share
    whose accepted predictions reach ``target_accuracy`` (needs true labels); or every prediction
    with a confidence below ``review_threshold``. ``run_dir``: a training run dir whose curves.png
    (or history.csv) is shown. ``limits``: how much the HTML shows and embeds. ``corrections``: a
    reviewer's ``path,label`` CSV (a model label or EXCLUDE per file): the verified differential.
    """
    if group_by is not None and group_by < 0:
        raise ValueError("group_by must be >= 0")
    job = _Job(Path(predictions_csv), Path(out_dir), group_by, ReviewPolicy(review_share, target_accuracy, review_threshold),
               LOW_CONFIDENCE if review_threshold is None else review_threshold, limits or ReportLimits(), [], on_warning)
    side = _read_side(job.csv_path, job.warn)
    table = None if corrections is None else read_corrections(corrections, csv_labels(job.csv_path), side.get("root"))
    s = scan(job.csv_path, job.level, job.threshold, job.limits, table)
    verified = None if table is None else verified_of(s, table, str(corrections), job.csv_path)
    _make_dir(job.out)  # after the scan and the corrections: a CSV refused leaves no empty folder behind
    _check_scan(job, side, s)
    plots = _plots(job)
    d = _report_data(job, side, s, verified, table)
    paths = {"review": job.out / "review.csv"} | _write_files(d, job, plots, None if run_dir is None else Path(run_dir))
    root = side.get("root")
    attach_images(d, Path(root) if root else job.csv_path.resolve().parent)
    paths["html"] = job.out / "report.html"
    paths["html"].write_text(render_html(d), encoding="utf-8")
    return paths


def _plots(job: _Job) -> bool:
    """Whether the figures can be drawn (matplotlib); a warning says how to get them when not."""
    plots = matplotlib_available()
    if not plots:
        job.warn(MATPLOTLIB_HINT)
    return plots


def _report_data(job: _Job, side: dict, s: Scan, verified: Verified | None, table: Mapping[str, LabelRow] | None) -> ReportData:
    """The trust figures, review.csv and everything the outputs show."""
    trust = build_trust(s, job.policy, ((side.get("model") or {}).get("trust") or {}).get("calibration"), job.warn)
    shown = {rec for heap in s.gallery.values() for _, rec, _ in heap}
    review, probs = write_review(job.csv_path, s, trust.queue, job.level, job.out / "review.csv", job.limits.review_max, shown)
    d = build_report_data(s, side, job.csv_path, job.threshold, _grouped(job, s), job.limits, job.warnings,
                          review=review, trust=trust, probs=probs)
    if verified is not None and table is not None:
        d.verified, d.corrections = verified, {path: r.label for path, r in table.items()}
        d.corrected = {path: s.labels[r.predicted] for path, r in s.reviewed.items()}
        d.metrics["verified"] = verified.to_json()
    return d


def _write_files(d: ReportData, job: _Job, plots: bool, run_dir: Path | None) -> dict[str, Path]:
    """per_class.csv, differential.csv, the figures and metrics.json; the figures also go into ``d`` for the HTML."""
    out = job.out
    paths = {"per_class": write_per_class(d, out / "per_class.csv")}
    if d.groups is not None:
        paths["differential"] = write_differential(d, out / "differential.csv")
    if plots and d.has_truth:
        paths.update(write_confusion_figures(d, out))
        d.figures = {k: uri for k in ("confusion_matrix", "confusion_matrix_normalized") if (uri := png_uri(paths[k]))}
    curves = find_curves(run_dir, out, plots, job.warn) if run_dir is not None else None
    if curves is not None:
        paths["curves"] = curves
        d.curves = (png_uri(curves) or "", str(curves))
    paths["metrics"] = write_metrics(d, {"review": out / "review.csv"} | paths, out)
    return paths
