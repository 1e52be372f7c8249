"""``wbc-batch info``: a model's metadata as a card a person reads (``--json`` prints it raw).

Why here and not in the library: this is presentation only. The metadata itself (what a model
file carries) is :class:`wbc_batch.inference.metadata.ModelMetadata`; its free-form ``extra``
sections (training, metrics, domain, export_parity, versions, created, and any a newer exporter
adds) are shown one item per line, in words, with metrics rounded to 3 decimals, lines wrapped
at their commas to :data:`WIDTH`. The training data and the domain check are summarised (what
was learnt from, what 'in domain' means); ``--json`` has every figure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..inference.model import Model

KEY_WIDTH = 12  # "preprocess: " and the other keys line up on one column
WIDTH = 120  # a line of the card at most (a single word longer than that, e.g. a path, stays whole)


def _wrap(first: str, text: str) -> str:
    """``first`` + ``text``, broken after a comma or semicolon so no line passes WIDTH; later lines indented past the key."""
    lines, cur = [], first
    for i, piece in enumerate(re.split(r"(?<=[,;]) ", text)):
        if i and len(cur) + 1 + len(piece) > WIDTH:
            lines.append(cur)
            cur = " " * (KEY_WIDTH + 2) + piece
        else:
            cur += f" {piece}" if i else piece
    return "\n".join([*lines, cur]).rstrip()


def _row(key: str, value: str) -> str:
    return _wrap(f"{key + ':':<{KEY_WIDTH - 1}} ", value)


def _more(value: str) -> str:
    return _wrap(" " * KEY_WIDTH, value)


def _num(v: Any, digits: int | None = None) -> str:
    """Numbers for people: metrics to ``digits`` decimals, other floats in their shortest exact form."""
    if isinstance(v, bool) or not isinstance(v, float):
        return _plain(v)
    return f"{v:.{digits}f}" if digits is not None else f"{v:g}"


def _plain(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and not any(isinstance(x, (Mapping, list, tuple)) for x in v):
        return " ".join(_plain(x) for x in v)  # e.g. a per-channel mean, or class names
    if isinstance(v, (Mapping, list, tuple)):
        return json.dumps(v)
    return _num(v) if isinstance(v, float) else str(v)


def _pairs(d: Mapping[str, Any], digits: int | None = None) -> str:
    return ", ".join(f"{k} {_num(v, digits)}" for k, v in d.items() if not isinstance(v, Mapping) and v is not None)


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
        # One line per true class (an 8-class matrix on one line is 190 characters, with no comma to break it at).
        lines.append(_more("confusion (rows true, columns predicted):"))
        lines += [_more(f"  {lb:<{width}}  " + " ".join(str(c) for c in row)) for lb, row in zip(labels, cm, strict=False)]
    return lines


def training_lines(training: Mapping[str, Any], labels: Sequence[str]) -> list[str]:
    """What the model learnt from: images and split, the weights' epoch, the start, each data folder, then the recipe."""
    folders = _folders(training)
    n_train, n_val = training.get("n_train"), training.get("n_val")
    parts = []
    if n_train is not None:
        split = f"{n_train + n_val} images in {len(folders)} folder{'s' * (len(folders) != 1)} ({n_train} train, {n_val} validation)" \
            if n_val is not None else f"{n_train} training images"
        parts.append(split)
    cfg = training.get("config") or {}
    if training.get("epoch") is not None:
        parts.append(f"weights of epoch {training['epoch']}" + (f" of {cfg['epochs']}" if cfg.get("epochs") else ""))
    known = ("data", "sources", "config", "n_train", "n_val", "epoch", "init")
    rest = {k: v for k, v in training.items() if k not in known}
    lines = [_row("training", "; ".join([*parts, *([_pairs(rest)] if rest else [])]) or "-")]
    if isinstance(training.get("init"), Mapping):
        init = training["init"]
        new = init.get("new") or []
        start = f"started from {init.get('weights', 'pretrained')} weights, " if init.get("kind") == "pretrained" else "fine-tuned from "
        lines.append(_more(f"{start}{init.get('from', '?')}" + (f" (new classes: {', '.join(new)})" if new else "")))
    lines += [_more(x) for x in folders]
    if cfg:
        lines.append(_more("recipe: " + _pairs(_recipe(cfg, labels))))
    return lines


def _folders(training: Mapping[str, Any]) -> list[str]:
    """One line per data folder: the images used (per class when recorded) and the folder's fingerprint.

    The counts come from ``sources`` (the images the run used, of its classes) where the model has it: a
    model exported before the fingerprint counted only the trained classes carries the folder's whole count
    in ``data`` (pbc/train: 4160 files where the model used 3560 of its 4 classes).
    """
    data = training.get("data") or []
    data = data if isinstance(data, list) else [data]
    sources = {s.get("path"): s for s in training.get("sources") or [] if isinstance(s, Mapping)}
    out = []
    for d in data:
        src = sources.get(d.get("path"), {})
        per_class = src.get("per_class") or {}
        count = f"{src['files']} images" if "files" in src else f"{d['files']} files" if "files" in d else "files not counted"
        classes = f" ({', '.join(f'{k} {v}' for k, v in per_class.items())})" if per_class else ""
        fp = d.get("sha256_names_sizes")
        out.append(f"{d.get('path', '?')}: {count}{classes}" + (f", fingerprint {fp[:12]}" if fp else ""))
    return out


def _recipe(cfg: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """The training config in words: HxW sizes, the crop as window and output, the class list only when it is not the model's."""
    out = dict(cfg)
    if isinstance(cfg.get("size"), list) and len(cfg["size"]) == 2:
        out["size"] = "x".join(map(str, cfg["size"]))
    if isinstance(cfg.get("crop"), list) and len(cfg["crop"]) == 2:
        window, size = cfg["crop"]
        out["crop"] = f"{window} px window to {size} px" if window else "none (whole field)"
    if list(cfg.get("class_subset") or []) == list(labels):
        del out["class_subset"]
    return out


def domain_lines(domain: Mapping[str, Any]) -> list[str]:
    """What 'in domain' means: the threshold and where it came from, what the score was fitted on, what it measures."""
    src = domain.get("threshold_from") or {}
    ref = domain.get("reference") or {}
    kind = "held-out" if src.get("held_out") else "training"
    where = f" (the {src['quantile']:g} quantile of {src.get('files', '?')} {kind} images)" if "quantile" in src else ""
    lines = [_row("domain", f"in domain when {domain.get('output', 'ood_score')} <= {_num(domain.get('threshold'))}{where}")]
    if ref:
        lines.append(_more(f"fitted on {ref.get('files', '?')} images of {ref.get('path', '?')}"))
    layers = [x for x in domain.get("layers") or [] if isinstance(x, Mapping)]
    feats = f"{len(layers)} layers ({', '.join(str(x.get('features', '?')) for x in layers)} features)" if layers else "the penultimate features"
    nucleus = domain.get("nucleus")
    lines.append(_more(f"score: distance to the nearest class mean in {feats}"
                       + (f"; raised for an image without a nucleus (signal threshold {_num(nucleus.get('threshold'))})"
                          if isinstance(nucleus, Mapping) else "")))
    return lines


def card_lines(m: Model) -> list[str]:
    """The whole card: the input contract first, then each provenance section the model carries."""
    md = m.metadata
    lines = header_lines(m)
    for key, value in md.extra.items():
        if key == "metrics" and isinstance(value, Mapping):
            lines += metrics_lines(value, md.labels)
        elif key == "training" and isinstance(value, Mapping):
            lines += training_lines(value, md.labels)
        elif key == "domain" and isinstance(value, Mapping):
            lines += domain_lines(value)
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
