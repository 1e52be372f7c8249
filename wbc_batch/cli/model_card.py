"""``wbc-batch info``: a model's metadata as a card a person reads (``--json`` prints it raw).

Why here and not in the library: this is presentation only. The metadata itself (what a model
file carries) is :class:`wbc_batch.inference.metadata.ModelMetadata`; its free-form ``extra``
sections (training, metrics, export_parity, versions, created, and any a newer exporter adds)
are shown whole, one line per item, with metrics rounded to 3 decimals; nothing is cut off.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..inference.model import Model

KEY_WIDTH = 12  # "preprocess: " and the other keys line up on one column


def _row(key: str, value: str) -> str:
    return f"{key + ':':<{KEY_WIDTH - 1}} {value}".rstrip()


def _more(value: str) -> str:
    return " " * KEY_WIDTH + value


def _num(v: Any, digits: int | None = None) -> str:
    """Numbers for people: metrics to ``digits`` decimals, other floats in their shortest exact form."""
    if isinstance(v, bool) or not isinstance(v, float):
        return _plain(v)
    return f"{v:.{digits}f}" if digits is not None else f"{v:g}"


def _plain(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (Mapping, list, tuple)):
        return json.dumps(v)
    return _num(v) if isinstance(v, float) else str(v)


def _pairs(d: Mapping[str, Any], digits: int | None = None) -> str:
    return ", ".join(f"{k} {_num(v, digits)}" for k, v in d.items() if not isinstance(v, Mapping))


def header_lines(m: Model) -> list[str]:
    md = m.metadata
    draft = ", JPEG draft" if md.jpeg_draft else ""
    return [
        _row("model", str(m.path)),
        _row("sha256", m.sha256),
        _row("name", f"{md.name}  (arch {md.arch or '?'})"),
        _row("labels", ", ".join(md.labels)),
        _row("input", f"{md.input_name}  {md.layout} {md.dtype} {md.height}x{md.width}x3 {md.color}"),
        _row("preprocess", f"decode, convert to RGB, {_fit(md)} ({md.resize}{draft})"),
        _row("output", f"{md.output_name}  ({md.output_kind})"),
        _row("providers", ", ".join(m.providers)),
    ]


def metrics_lines(metrics: Mapping[str, Any], labels: Sequence[str]) -> list[str]:
    """Where the figures were measured, the headline scores, then one line per class."""
    where = f"on {metrics['eval_dir']}, " if metrics.get("eval_dir") else ""
    n = f"{metrics['n']} images: " if "n" in metrics else ""
    head = {k: v for k, v in metrics.items() if k not in ("eval_dir", "n", "per_class", "confusion_matrix")}
    lines = [_row("metrics", f"{where}{n}{_pairs(head, 3)}")]
    per_class = metrics.get("per_class") or {}
    width = max((len(lb) for lb in per_class), default=0)
    for lb in [*labels, *(k for k in per_class if k not in labels)]:
        if lb in per_class:
            lines.append(_more(f"{lb:<{width}}  {_pairs(per_class[lb], 3)}"))
    cm = metrics.get("confusion_matrix")
    if cm:
        lines.append(_more("confusion (rows true, columns predicted): " + " | ".join(" ".join(str(c) for c in row) for row in cm)))
    return lines


def training_lines(training: Mapping[str, Any]) -> list[str]:
    """The data a model learnt from (path, file count, fingerprint), the split, then the recipe."""
    data = training.get("data") or {}
    parts = []
    for d in data if isinstance(data, list) else [data] if data else []:  # a list: one entry per data folder trained on
        fp = d.get("sha256_names_sizes")
        parts.append(f"{d.get('path', '?')}, {d.get('files', '?')} files" + (f" (fingerprint {fp[:12]}...)" if fp else ""))
    rest = {k: v for k, v in training.items() if k not in ("data", "config")}
    if rest:
        parts.append(_pairs(rest))
    lines = [_row("training", "; ".join(parts))]
    if training.get("config"):
        lines.append(_more(_pairs(training["config"])))
    return lines


def card_lines(m: Model) -> list[str]:
    """The whole card: the input contract first, then each provenance section the model carries."""
    md = m.metadata
    lines = header_lines(m)
    for key, value in md.extra.items():
        if key == "metrics" and isinstance(value, Mapping):
            lines += metrics_lines(value, md.labels)
        elif key == "training" and isinstance(value, Mapping):
            lines += training_lines(value)
        elif key == "batchnorm" and isinstance(value, list):  # thousands of numbers: what they are for, not them
            lines.append(_row(key, f"{len(value)} folded batch norms recorded ({sum(len(x.get('mean', [])) for x in value)} "
                                   "channels): what wbc-batch adapt needs"))
        elif isinstance(value, Mapping):
            lines.append(_row(key, _pairs(value)))
            lines += [_more(f"{k}: {_pairs(v)}") for k, v in value.items() if isinstance(v, Mapping)]
        else:
            lines.append(_row(key, _plain(value)))
    return lines


def _fit(md) -> str:
    if md.keep_aspect:
        return f"fit inside {md.width}x{md.height} keeping the aspect ratio, centred on black"
    return f"resize to {md.width}x{md.height}"
