"""Evaluation report from a predictions CSV: metrics.json, per_class.csv, matrices, report.html.

The CSV is read once, streaming: counts, the confusion matrix, the confidence histogram and
the per-group differential are accumulated as it goes, and only a capped number of rows is
kept (the most confident mistakes of each true/predicted pair for the gallery, the least
confident predictions for the review list, the first failed files). The full list of
low-confidence files goes to review.csv as the CSV is read, so memory does not grow with
the number of rows.

matplotlib (the ``report`` extra) draws the PNG figures and is imported only when they are
drawn. Without it the report is still written (numbers, tables, thumbnails, CSS bar charts)
and a warning says how to get the figures.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import heapq
import html
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..inference.predictions import PROB_PREFIX, STATUS_OK, OutputError, read_sidecar
from .metrics import metrics_from_confusion, normalize_rows

# Non-UTF-8 file names are kept as surrogates in the predictions CSV (as predictions.py writes them).
ENCODING_ERRORS = "surrogateescape"

#: Caps on what the HTML shows (the CSVs hold everything).
GALLERY_PER_PAIR = 8
GALLERY_MAX = 160
REVIEW_MAX = 500
FAILED_MAX = 1000
TOP_CONFUSIONS = 10
HIST_BINS = 20
THUMB_SIZE = (116, 116)

MATPLOTLIB_HINT = "matplotlib is not installed, so the report has no figures: pip install 'wbc-batch[report]'"

_REQUIRED = ("path", "label", "confidence", "true_label", "status", "error")


class ReportError(Exception):
    """The predictions CSV cannot be reported on; the message says why."""


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- reading


@dataclass
class _Group:
    n: int = 0
    errors: int = 0
    low: int = 0
    counts: list[int] = field(default_factory=list)


@dataclass
class _Scan:
    labels: list[str]
    files: int = 0
    ok: int = 0
    errors: int = 0
    without_truth: int = 0
    malformed: int = 0
    low_confidence: int = 0
    cm: list[list[int]] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    conf_sum: list[float] = field(default_factory=list)
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    groups: dict[str, _Group] = field(default_factory=dict)
    gallery: dict[tuple[int, int], list] = field(default_factory=dict)  # min-heaps of (conf, seq, path)
    review: list = field(default_factory=list)  # max-heap (by -conf) of the least confident
    failed: list[tuple[str, str]] = field(default_factory=list)


def _labels_from_header(header: Sequence[str], path: Path) -> list[str]:
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise ReportError(f"{path} is not a predictions CSV: no {', '.join(missing)} column(s) in its header {list(header)[:8]}")
    labels = [c[len(PROB_PREFIX) :] for c in header if c.startswith(PROB_PREFIX)]
    if not labels:
        raise ReportError(f"{path} has no {PROB_PREFIX}<LABEL> columns, so its class list is unknown")
    return labels


def group_key(rel: str, level: int) -> str:
    """The first ``level`` folders of a run-relative path ('.' for files directly under the root)."""
    parts = PurePosixPath(rel).parts[:-1]
    return "/".join(parts[:level]) if parts else "."


def _scan(csv_path: Path, level: int, threshold: float, review_csv: Path) -> _Scan:
    try:
        f = open(csv_path, encoding="utf-8", errors=ENCODING_ERRORS, newline="")
    except OSError as e:
        raise ReportError(f"cannot read {csv_path}: {e.strerror or e}") from e
    with f, open(review_csv, "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as rf:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ReportError(f"{csv_path} is empty")
        labels = _labels_from_header(header, csv_path)
        k = len(labels)
        s = _Scan(labels=labels, cm=[[0] * k for _ in range(k)], predicted=[0] * k, conf_sum=[0.0] * k)
        col = {c: i for i, c in enumerate(header)}
        i_path, i_label, i_conf = col["path"], col["label"], col["confidence"]
        i_true, i_status, i_err = col["true_label"], col["status"], col["error"]
        ncols = len(header)
        index = {lb: i for i, lb in enumerate(labels)}
        review = csv.writer(rf, lineterminator="\n")
        review.writerow(["path", "label", "confidence", "true_label", "group"])
        groups, gallery, rv, failed, hist, cm = s.groups, s.gallery, s.review, s.failed, s.hist, s.cm
        seq = 0
        for rec in reader:
            if len(rec) != ncols:
                s.malformed += 1  # e.g. a torn last line of an interrupted run
                continue
            rel = rec[i_path]
            g = groups.get(gk := group_key(rel, level))
            if g is None:
                g = groups[gk] = _Group(counts=[0] * k)
            s.files += 1
            g.n += 1
            if rec[i_status] != STATUS_OK:
                s.errors += 1
                g.errors += 1
                if len(failed) < FAILED_MAX:
                    failed.append((rel, rec[i_err]))
                continue
            pi = index.get(rec[i_label])
            try:
                conf = float(rec[i_conf])
            except ValueError:
                pi = None
            if pi is None or not (0.0 <= conf <= 1.0):
                s.malformed += 1
                s.files -= 1
                g.n -= 1
                continue
            s.ok += 1
            g.counts[pi] += 1
            s.predicted[pi] += 1
            s.conf_sum[pi] += conf
            hist[min(int(conf * HIST_BINS), HIST_BINS - 1)] += 1
            seq += 1
            truth = rec[i_true]
            if conf < threshold:
                s.low_confidence += 1
                g.low += 1
                review.writerow([rel, rec[i_label], rec[i_conf], truth, gk])
                item = (-conf, seq, rel, pi, truth, gk)
                if len(rv) < REVIEW_MAX:
                    heapq.heappush(rv, item)
                elif item > rv[0]:
                    heapq.heapreplace(rv, item)
            ti = index.get(truth) if truth else None
            if ti is None:
                s.without_truth += 1
                continue
            cm[ti][pi] += 1
            if ti != pi:
                h = gallery.setdefault((ti, pi), [])
                item = (conf, seq, rel)
                if len(h) < GALLERY_PER_PAIR:
                    heapq.heappush(h, item)
                elif item > h[0]:
                    heapq.heapreplace(h, item)
    return s


# --------------------------------------------------------------------------- helpers


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(path: Path) -> str | None:
    """A small JPEG of the image as a data URI, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB_SIZE[0] * 2, THUMB_SIZE[1] * 2))  # JPEG: decode at a reduced scale
            im = im.convert("RGB")
            im.thumbnail(THUMB_SIZE)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - missing, moved or corrupt image: the gallery shows a placeholder
        return None
    return _b64(buf.getvalue(), "image/jpeg")


def _png(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return _b64(path.read_bytes(), "image/png")


def _e(x: object) -> str:
    """HTML-escaped text; bytes of a non-UTF-8 file name (kept as surrogates) show as U+FFFD."""
    t = str(x)
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        t = t.encode("utf-8", ENCODING_ERRORS).decode("utf-8", "replace")
    return html.escape(t, quote=True)


def _f(x: float | None, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pct(a: int, b: int) -> float:
    return 100.0 * a / b if b else 0.0


def _auto_group(groups: dict[str, _Group], labels: Sequence[str]) -> bool:
    """Group by the first folder level when some of those folders are not class names."""
    upper = {lb.upper() for lb in labels}
    return any(g != "." and g.upper() not in upper for g in groups)


def _stderr_warning(msg: str) -> None:
    print(f"wbc-batch: warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- main entry


def write_report(
    predictions_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    group_by: int | None = None,
    review_threshold: float = 0.5,
    run_dir: str | os.PathLike[str] | None = None,
    on_warning: Callable[[str], None] | None = _stderr_warning,
) -> dict[str, Path]:
    """Write the report files for ``predictions_csv`` into ``out_dir``; returns their paths by kind.

    ``group_by``: folder depth under the input root that makes one group (slide) of the
    differential; ``None`` = 1 when those first-level folders are not class names, else no
    differential; 0 = no differential. ``review_threshold``: predictions with a lower
    confidence are listed for human review. ``run_dir``: a training run dir whose curves.png
    (or history.csv) is shown.
    """
    csv_path = Path(predictions_csv)
    out = Path(out_dir)
    if group_by is not None and group_by < 0:
        raise ValueError("group_by must be >= 0")
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        if on_warning is not None:
            on_warning(msg)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create report folder {out}: {e.strerror or e}") from e
    paths: dict[str, Path] = {}
    try:
        side = read_sidecar(csv_path) or {}
    except OutputError as e:
        warn(str(e))
        side = {}
    if not side:
        warn(f"no readable {csv_path.name}.run.json beside the CSV: model identity, input root and throughput are unknown")

    paths["review"] = out / "review.csv"
    s = _scan(csv_path, group_by or 1, review_threshold, paths["review"])
    labels = s.labels
    k = len(labels)
    model = dict(side.get("model") or {})
    if model.get("labels") and list(model["labels"]) != labels:
        warn(f"the sidecar's model labels {model['labels']} differ from the CSV's {labels}; the CSV's are used")
    if s.malformed:
        warn(f"{s.malformed} malformed row(s) skipped (a torn last line of an interrupted run, or an edited CSV)")
    root = side.get("root")
    image_root = Path(root) if root else csv_path.resolve().parent
    summary = side.get("summary") or {}
    has_truth = s.ok - s.without_truth > 0
    grouped = group_by is not None and group_by > 0 or group_by is None and _auto_group(s.groups, labels)
    level = group_by or 1
    plots = matplotlib_available()
    if not plots:
        warn(MATPLOTLIB_HINT)

    # ---- metrics
    cm = np.asarray(s.cm, dtype=np.int64).reshape(k, k)
    mean_conf = [s.conf_sum[i] / s.predicted[i] if s.predicted[i] else None for i in range(k)]
    if has_truth:
        m = metrics_from_confusion(cm, labels).to_dict()
        for i, lb in enumerate(labels):
            m["per_class"][lb].update(predicted=s.predicted[i], mean_confidence=mean_conf[i])
    else:
        m = {
            "labels": labels,
            "n": 0,
            "accuracy": None,
            "macro_precision": None,
            "macro_recall": None,
            "macro_f1": None,
            "weighted_precision": None,
            "weighted_recall": None,
            "weighted_f1": None,
            "per_class": {
                lb: {"predicted": s.predicted[i], "percent": _pct(s.predicted[i], s.ok), "mean_confidence": mean_conf[i]}
                for i, lb in enumerate(labels)
            },
            "confusion_matrix": None,
            "confusion_matrix_normalized": None,
        }
    pairs = sorted(((int(cm[t, p]), t, p) for t in range(k) for p in range(k) if t != p and cm[t, p]), key=lambda x: (-x[0], x[1], x[2]))
    support = cm.sum(axis=1)
    top = [
        {"true": labels[t], "predicted": labels[p], "count": c, "percent_of_true": round(_pct(c, int(support[t])), 4)}
        for c, t, p in pairs[:TOP_CONFUSIONS]
    ]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    metrics = {
        **m,
        "has_truth": has_truth,
        "counts": {
            "files": s.files,
            "ok": s.ok,
            "errors": s.errors,
            "with_truth": s.ok - s.without_truth,
            "without_truth": s.without_truth,
            "low_confidence": s.low_confidence,
            "malformed_rows": s.malformed,
        },
        "review_threshold": review_threshold,
        "top_confusions": top,
        "model": {key: model.get(key) for key in ("name", "sha256", "labels", "arch", "path")},
        "root": root,
        "inputs": side.get("inputs"),
        "predictions_csv": str(csv_path.resolve()),
        "throughput": {
            "images_per_s": summary.get("images_per_s"),
            "wall_s": summary.get("wall_s"),
            "processed": summary.get("processed"),
            "options": side.get("options"),
        },
        "run": {"started": side.get("started"), "finished": side.get("finished"), "state": side.get("state")},
        "date": now,
        "group_by": level if grouped else None,
        "warnings": warnings,
    }

    # ---- per_class.csv
    paths["per_class"] = out / "per_class.csv"
    with open(paths["per_class"], "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["label", "precision", "recall", "f1", "support", "predicted", "predicted_percent", "mean_confidence"])
        for i, lb in enumerate(labels):
            pc = m["per_class"][lb]
            w.writerow(
                [
                    lb,
                    *(
                        [f"{pc['precision']:.6f}", f"{pc['recall']:.6f}", f"{pc['f1']:.6f}", pc["support"]]
                        if has_truth
                        else ["", "", "", ""]
                    ),
                    s.predicted[i],
                    f"{_pct(s.predicted[i], s.ok):.4f}",
                    f"{mean_conf[i]:.6f}" if mean_conf[i] is not None else "",
                ]
            )

    # ---- differential.csv
    if grouped:
        paths["differential"] = out / "differential.csv"
        with open(paths["differential"], "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["group", "n", "ok", *[f"count_{lb}" for lb in labels], *[f"pct_{lb}" for lb in labels], "errors", "low_confidence"])
            for gk in sorted(s.groups):
                g = s.groups[gk]
                ok = g.n - g.errors
                w.writerow([gk, g.n, ok, *g.counts, *[f"{_pct(c, ok):.2f}" for c in g.counts], g.errors, g.low])

    # ---- figures
    if plots and has_truth:
        from .plots import plot_confusion

        paths["confusion_matrix"] = out / "confusion_matrix.png"
        paths["confusion_matrix_normalized"] = out / "confusion_matrix_normalized.png"
        plot_confusion(cm, labels, paths["confusion_matrix"])
        plot_confusion(cm, labels, paths["confusion_matrix_normalized"], normalized=True)
    curves: Path | None = None
    if run_dir is not None:
        rd = Path(run_dir)
        if (rd / "curves.png").is_file():
            curves = rd / "curves.png"
        elif (rd / "history.csv").is_file() and plots:
            from .plots import plot_history

            try:
                plot_history(rd / "history.csv", out / "training_curves.png")
                curves = out / "training_curves.png"
            except (ValueError, KeyError, OSError) as e:
                warn(f"cannot draw the training curves from {rd / 'history.csv'}: {e}")
        elif (rd / "history.csv").is_file():
            warn(f"{rd} has no curves.png, and drawing one from its history.csv needs matplotlib: no training curves")
        else:
            warn(f"no curves.png or history.csv in {rd}: no training curves")
        if curves is not None:
            paths["curves"] = curves

    # ---- metrics.json
    paths["metrics"] = out / "metrics.json"
    metrics["files"] = {kind: p.name if p.parent == out else str(p) for kind, p in paths.items()} | {"html": "report.html"}
    paths["metrics"].write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")

    # ---- report.html
    paths["html"] = out / "report.html"
    page = _render_html(s, metrics, cm, paths, image_root, grouped, level, review_threshold, csv_path, curves, plots)
    paths["html"].write_text(page, encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- HTML

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1c2430;margin:0;background:#f3f5f8}
main{max-width:1160px;margin:0 auto;padding:20px 24px 48px}
header{background:#1f3a5f;color:#fff;padding:18px 24px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header p{margin:0;opacity:.85;font-size:13px}
section{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:16px 20px;margin:18px 0}
h2{font-size:17px;margin:0 0 12px;color:#1f3a5f}
h3{font-size:14px;margin:16px 0 8px}
table{border-collapse:collapse;font-size:13px}
th,td{padding:5px 10px;border-bottom:1px solid #e6eaef;text-align:left;vertical-align:top}
th{background:#f0f3f7;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px;margin-bottom:14px}
.card{background:#f7f9fc;border:1px solid #e1e7ee;border-radius:6px;padding:10px 14px}
.card .v{font-size:24px;font-weight:600;color:#1f3a5f}
.card .k{font-size:12px;color:#5b6675;text-transform:uppercase;letter-spacing:.04em}
.card.bad .v{color:#b3261e}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0;font-size:13px}
dl.meta dt{color:#5b6675}
dl.meta dd{margin:0;word-break:break-all}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f3f7;padding:1px 4px;border-radius:3px}
.figs{display:flex;flex-wrap:wrap;gap:12px}
.figs figure{margin:0;flex:1 1 420px}
.figs img{width:100%;height:auto;border:1px solid #e6eaef}
figcaption{font-size:12px;color:#5b6675}
.warn{background:#fff7e0;border-color:#f0d58a}
.warn li{margin:2px 0}
.pair{margin-top:14px}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}
.thumb{margin:0;width:126px;background:#f7f9fc;border:1px solid #e1e7ee;border-radius:4px;padding:4px;text-align:center}
.thumb img{display:block;margin:0 auto 3px;max-width:116px;max-height:116px}
.thumb .ph{width:116px;height:87px;margin:0 auto 3px;background:#e8ecf1;color:#7a8594;font-size:11px;display:flex;align-items:center;justify-content:center}
.thumb figcaption{line-height:1.3}
.thumb .fn{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.bars td.bar{width:420px}
.bars .b{height:14px;background:#4f81bd;border-radius:2px}
.hist{display:flex;align-items:flex-end;gap:2px;height:140px;border-bottom:1px solid #9aa5b1;max-width:640px}
.hist div{flex:1;background:#4f81bd;min-height:1px}
.hist div.low{background:#d9822b}
.hist-axis{display:flex;justify-content:space-between;max-width:640px;font-size:11px;color:#5b6675}
table.cm td{text-align:right;min-width:64px}
.muted{color:#5b6675}
.scroll{max-height:480px;overflow:auto;border:1px solid #e6eaef}
.scroll table{width:100%}
.scroll th{position:sticky;top:0}
nav{font-size:13px;margin-top:8px}
nav a{color:#cfe0f5;margin-right:12px;text-decoration:none}
@media print{.scroll{max-height:none;overflow:visible}nav{display:none}}
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[object]], *, num: Sequence[int] = (), cls: str = "", tid: str = "") -> str:
    n = set(num)
    out = [f"<table{f' id={chr(34)}{tid}{chr(34)}' if tid else ''}{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}><thead><tr>"]
    out += [f"<th{' class=num' if i in n else ''}>{_e(h)}</th>" for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td{' class=num' if i in n else ''}>{v}</td>" for i, v in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _cm_table(cm: np.ndarray, labels: Sequence[str]) -> str:
    norm = normalize_rows(cm)
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th class=num>{_e(lb)}</th>" for lb in labels) + "</tr>"
    rows = []
    for i, lb in enumerate(labels):
        cells = []
        for j in range(len(labels)):
            a = norm[i, j]
            color = "#fff" if a > 0.55 else "#1c2430"
            cells.append(f'<td style="background:rgba(31,90,160,{a * 0.85:.3f});color:{color}">{int(cm[i, j])}</td>')
        rows.append(f"<tr><th>{_e(lb)}</th>{''.join(cells)}</tr>")
    return f'<table class="cm" id="confusion-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _render_html(
    s: _Scan,
    mt: dict,
    cm: np.ndarray,
    paths: dict[str, Path],
    image_root: Path,
    grouped: bool,
    level: int,
    threshold: float,
    csv_path: Path,
    curves: Path | None,
    plots: bool,
) -> str:
    labels = s.labels
    k = len(labels)
    has_truth = mt["has_truth"]
    model = mt["model"]
    parts: list[str] = []
    nav = [("summary", "Summary"), ("per-class", "Per class")]
    if has_truth:
        nav += [("confusion-matrix", "Confusion matrix"), ("top-confusions", "Top confusions"), ("gallery", "Misclassified")]
    nav += [("distribution", "Predictions")]
    if grouped:
        nav.append(("differential", "Differential"))
    nav += [("review", "Review"), ("failed", "Failed files")]
    if curves is not None:
        nav.append(("training-curves", "Training"))

    title = f"wbc-batch report: {csv_path.name}"
    parts.append(
        f'<!DOCTYPE html><html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>model {_e(model.get('name') or '?')} · generated {_e(mt['date'])}</p>"
        f"<nav>{''.join(f'<a href=#{a}>{_e(t)}</a>' for a, t in nav)}</nav></header><main>"
    )

    # -- summary
    c = mt["counts"]
    cards = []
    if has_truth:
        cards += [("accuracy", _f(mt["accuracy"])), ("macro F1", _f(mt["macro_f1"])), ("weighted F1", _f(mt["weighted_f1"]))]
    cards += [("files", f"{c['files']:,}"), ("classified", f"{c['ok']:,}")]
    cards.append(("errors", f"{c['errors']:,}", "bad" if c["errors"] else ""))
    cards.append((f"confidence < {threshold:g}", f"{c['low_confidence']:,}"))
    ips = mt["throughput"]["images_per_s"]
    cards.append(("images / s", _f(ips, 1) if isinstance(ips, (int, float)) else "–"))
    card_html = "".join(
        f'<div class="card {x[2] if len(x) > 2 else ""}"><div class=v>{_e(x[1])}</div><div class=k>{_e(x[0])}</div></div>' for x in cards
    )
    sha = model.get("sha256") or ""
    meta = [
        ("model", f"{_e(model.get('name') or '?')} <span class=muted>(arch {_e(model.get('arch') or '?')})</span>"),
        ("model sha256", f"<code>{_e(sha or '?')}</code>"),
        ("model file", _e(model.get("path") or "?")),
        ("labels", ", ".join(_e(lb) for lb in labels)),
        ("input root", _e(mt["root"] or "?")),
        ("predictions", _e(mt["predictions_csv"])),
        ("run", f"{_e(mt['run'].get('started') or '?')} → {_e(mt['run'].get('finished') or '?')} ({_e(mt['run'].get('state') or '?')})"),
        ("truth", f"{c['with_truth']:,} classified files with a true label, {c['without_truth']:,} without"),
    ]
    wall = mt["throughput"].get("wall_s")
    if isinstance(wall, (int, float)):
        meta.append(("wall time", f"{wall:.1f} s"))
    parts.append(
        f'<section id="summary"><h2>Summary</h2><div class=cards>{card_html}</div><dl class=meta>'
        + "".join(f"<dt>{_e(a)}</dt><dd>{b}</dd>" for a, b in meta)
        + "</dl></section>"
    )
    if mt["warnings"]:
        parts.append(
            '<section class=warn id="warnings"><h2>Warnings</h2><ul>'
            + "".join(f"<li>{_e(w)}</li>" for w in mt["warnings"])
            + "</ul></section>"
        )

    # -- per class
    rows = []
    for i, lb in enumerate(labels):
        pc = mt["per_class"][lb]
        mc = _f(s.conf_sum[i] / s.predicted[i]) if s.predicted[i] else "–"
        if has_truth:
            rows.append([_e(lb), _f(pc["precision"]), _f(pc["recall"]), _f(pc["f1"]), f"{pc['support']:,}", f"{s.predicted[i]:,}", mc])
        else:
            rows.append([_e(lb), f"{s.predicted[i]:,}", f"{_pct(s.predicted[i], s.ok):.1f}%", mc])
    if has_truth:
        rows.append(
            [
                "<b>macro avg</b>",
                _f(mt["macro_precision"]),
                _f(mt["macro_recall"]),
                _f(mt["macro_f1"]),
                f"{c['with_truth']:,}",
                f"{s.ok - s.without_truth:,}",
                "",
            ]
        )
        rows.append(
            [
                "<b>weighted avg</b>",
                _f(mt["weighted_precision"]),
                _f(mt["weighted_recall"]),
                _f(mt["weighted_f1"]),
                f"{c['with_truth']:,}",
                "",
                "",
            ]
        )
        head = ["class", "precision", "recall", "F1", "support", "predicted", "mean confidence"]
        tbl = _table(head, rows, num=range(1, 7), tid="per-class-table")
    else:
        tbl = _table(["class", "predicted", "share", "mean confidence"], rows, num=range(1, 4), tid="per-class-table")
    note = (
        ""
        if has_truth
        else "<p class=muted>No true labels in this CSV (no class-named folders and no --labels CSV): accuracy cannot be computed.</p>"
    )
    parts.append(f'<section id="per-class"><h2>Per class</h2>{note}{tbl}</section>')

    if has_truth:
        # -- confusion matrices
        figs = ""
        for key, cap in (("confusion_matrix", "counts"), ("confusion_matrix_normalized", "row-normalised (recall on the diagonal)")):
            uri = _png(paths.get(key))
            if uri:
                figs += f'<figure><img src="{uri}" alt="confusion matrix, {_e(cap)}"><figcaption>{_e(cap)}</figcaption></figure>'
        table = _cm_table(cm, labels)
        if figs:
            body = f"<div class=figs>{figs}</div><details><summary>as a table</summary>{table}</details>"
        else:
            body = f"<p class=muted>{_e(MATPLOTLIB_HINT)}</p>{table}"
        parts.append(
            f'<section id="confusion-matrix"><h2>Confusion matrix</h2><p class=muted>rows: true class, columns: predicted class</p>{body}</section>'
        )

        # -- top confusions
        top = mt["top_confusions"]
        if top:
            rows = [[_e(t["true"]), _e(t["predicted"]), f"{t['count']:,}", f"{t['percent_of_true']:.1f}%"] for t in top]
            body = _table(["true", "predicted as", "files", "% of the true class"], rows, num=(2, 3))
        else:
            body = "<p>No confusions: every file with a true label was classified correctly.</p>"
        parts.append(f'<section id="top-confusions"><h2>Most frequent confusions</h2>{body}</section>')

        # -- gallery
        parts.append(_gallery(s, cm, image_root))

    # -- predicted distribution + confidence histogram (CSS only)
    mx = max(s.predicted) if s.predicted and max(s.predicted) else 1
    rows = [
        [
            _e(lb),
            f"{s.predicted[i]:,}",
            f"{_pct(s.predicted[i], s.ok):.1f}%",
            f'<div class=b style="width:{100 * s.predicted[i] / mx:.1f}%"></div>',
        ]
        for i, lb in enumerate(labels)
    ]
    dist = _table(["predicted class", "files", "share", ""], rows, num=(1, 2), cls="bars").replace(
        "<td>" + "<div class=b", "<td class=bar><div class=b"
    )
    hm = max(s.hist) or 1
    bins = "".join(
        f'<div class="{"low" if (b + 1) / HIST_BINS <= threshold else ""}" style="height:{100 * v / hm:.1f}%" '
        f'title="{b / HIST_BINS:.2f}–{(b + 1) / HIST_BINS:.2f}: {v:,} files"></div>'
        for b, v in enumerate(s.hist)
    )
    hist = (
        f'<div id="confidence-histogram"><h3>Confidence of the predicted class</h3><div class=hist>{bins}</div>'
        f"<div class=hist-axis><span>0</span><span>0.25</span><span>0.5</span><span>0.75</span><span>1</span></div>"
        f"<p class=muted>{HIST_BINS} bins; orange: below the review threshold {threshold:g}. "
        f"Median bin: {_median_bin(s.hist)}.</p></div>"
    )
    parts.append(f'<section id="distribution"><h2>Predictions</h2><div id="prediction-distribution">{dist}</div>{hist}</section>')

    # -- differential
    if grouped:
        rows = []
        for gk in sorted(s.groups):
            g = s.groups[gk]
            ok = g.n - g.errors
            rows.append(
                [
                    _e(gk),
                    f"{g.n:,}",
                    *[f"{cnt:,} <span class=muted>({_pct(cnt, ok):.1f}%)</span>" for cnt in g.counts],
                    f"{g.errors:,}",
                    f"{g.low:,}",
                ]
            )
        tbl = _table(["group", "files", *labels, "errors", f"conf < {threshold:g}"], rows, num=range(1, k + 4), tid="differential-table")
        parts.append(
            f'<section id="differential"><h2>Differential per group</h2><p class=muted>One group per folder at depth {level} under the input root; '
            f"predicted counts (percent of the group's classified files). Also in <code>differential.csv</code>.</p>"
            f"<div class=scroll>{tbl}</div></section>"
        )

    # -- review list
    items = sorted(s.review, key=lambda x: (-x[0], x[1]))  # least confident first
    shown = len(items)
    if items:
        rows = [[_e(r[2]), _e(labels[r[3]]), _f(-r[0]), _e(r[4] or "–"), _e(r[5])] for r in items]
        tbl = f"<div class=scroll>{_table(['file', 'predicted', 'confidence', 'true', 'group'], rows, num=(2,), tid='review-table')}</div>"
    else:
        tbl = "<p>None.</p>"
    more = (
        f" The {shown:,} least confident are listed; all of them are in <code>review.csv</code>."
        if s.low_confidence > shown
        else " All are also in <code>review.csv</code>."
    )
    parts.append(
        f'<section id="review"><h2>Low-confidence predictions for review</h2><p class=muted>{s.low_confidence:,} classified files '
        f"have a confidence below {threshold:g}.{more if s.low_confidence else ''}</p>{tbl}</section>"
    )

    # -- failed files
    if s.failed:
        rows = [[_e(p), _e(err or "?")] for p, err in s.failed]
        more = (
            f"<p class=muted>The first {len(s.failed):,} of {s.errors:,} are listed; the rest have status=error in the predictions CSV.</p>"
            if s.errors > len(s.failed)
            else ""
        )
        body = f"{more}<div class=scroll>{_table(['file', 'error'], rows, tid='failed-table')}</div>"
    else:
        body = "<p>None: every file was read and classified.</p>"
    parts.append(f'<section id="failed"><h2>Failed files ({s.errors:,})</h2>{body}</section>')

    # -- training curves
    if curves is not None:
        parts.append(
            f'<section id="training-curves"><h2>Training curves</h2><div class=figs><figure><img src="{_png(curves)}" alt="training curves">'
            f"<figcaption>{_e(curves)}</figcaption></figure></div></section>"
        )
    parts.append(f"<p class=muted>wbc-batch report · {_e(mt['date'])}</p></main></body></html>")
    return "\n".join(parts)


def _median_bin(hist: Sequence[int]) -> str:
    total = sum(hist)
    if not total:
        return "–"
    acc = 0
    for b, v in enumerate(hist):
        acc += v
        if acc * 2 >= total:
            return f"{b / HIST_BINS:.2f}–{(b + 1) / HIST_BINS:.2f}"
    return "–"


def _gallery(s: _Scan, cm: np.ndarray, image_root: Path) -> str:
    labels = s.labels
    order = sorted(s.gallery, key=lambda tp: (-int(cm[tp]), tp))
    budget = GALLERY_MAX
    blocks = []
    for t, p in order:
        if budget <= 0:
            break
        items = sorted(s.gallery[(t, p)], key=lambda x: (-x[0], x[1]))[:budget]
        budget -= len(items)
        figs = []
        for conf, _, rel in items:
            uri = _thumbnail(image_root / rel)
            img = f'<img src="{uri}" alt="{_e(rel)}">' if uri else "<div class=ph>image not found</div>"
            figs.append(
                f'<figure class=thumb title="{_e(rel)}">{img}<figcaption><div class=fn>{_e(PurePosixPath(rel).name)}</div>conf {conf:.2f}</figcaption></figure>'
            )
        total = int(cm[t, p])
        blocks.append(
            f"<div class=pair><h3>true {_e(labels[t])} → predicted {_e(labels[p])} "
            f"<span class=muted>({total:,} files{f', the {len(items)} most confident shown' if total > len(items) else ''})</span></h3>"
            f"<div class=thumbs>{''.join(figs)}</div></div>"
        )
    if not blocks:
        body = "<p>No misclassified files.</p>"
    else:
        body = "".join(blocks)
        if budget <= 0 and len(order) > len(blocks):
            body += (
                f"<p class=muted>{len(order) - len(blocks)} rarer confusion pair(s) not shown (gallery capped at {GALLERY_MAX} images).</p>"
            )
    return (
        f'<section id="gallery"><h2>Misclassified files</h2><p class=muted>Grouped by (true, predicted), most frequent pair first; '
        f"in each pair the most confident mistakes, up to {GALLERY_PER_PAIR}.</p>{body}</section>"
    )
