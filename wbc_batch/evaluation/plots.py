"""Matplotlib figures shared by training (validation matrix) and reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Every text in our figures is drawn as written. Class names come from a model's metadata or from folder
#: names; with mathtext on, a '$' pair in one is typeset as math and an unbalanced one ('$x^$') raises
#: a parse error at savefig, which cost the whole report.
_PLAIN_TEXT = {"text.parse_math": False}


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: str | Path, *, normalized: bool = False, title: str = "") -> None:
    """Confusion matrix with class names on both axes and the value in every cell."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(_PLAIN_TEXT):
        _draw_confusion(cm, labels, path, normalized=normalized, title=title)


def _draw_confusion(cm: np.ndarray, labels: Sequence[str], path: str | Path, *, normalized: bool, title: str) -> None:
    import matplotlib.pyplot as plt

    from .metrics import normalize_rows

    values = normalize_rows(cm) if normalized else np.asarray(cm)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 * n + 2.8, 0.85 * n + 2.2), dpi=110)
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalized else max(1, values.max()))
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalized else "confusion matrix (counts)"))
    hi = (1 if normalized else max(1, values.max())) / 2
    for i in range(n):
        for j in range(n):
            v = values[i, j]
            ax.text(j, i, f"{v:.2f}" if normalized else f"{int(v)}", ha="center", va="center", fontsize=12, color="white" if v > hi else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def history_figure(rows: Sequence[dict]):
    """The training-curves figure (loss; accuracy and macro-F1) of history rows; markers show every epoch.

    Why markers: a one-epoch run is a single point per curve, which a line alone does not draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    ep = col("epoch")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, lab in (("train_loss", "train"), ("val_loss", "val")):
        if key in rows[0]:
            a.plot(ep, col(key), label=lab, marker="o", markersize=4)
    a.set(title="loss", xlabel="epoch")
    a.legend()
    for key, lab, ls in (("train_accuracy", "train", "-"), ("val_accuracy", "val", "-"), ("val_macro_f1", "val macro-F1", "--")):
        if key in rows[0]:
            b.plot(ep, col(key), label=lab, linestyle=ls, marker="o", markersize=4)
    b.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    b.legend()
    fig.tight_layout()
    return fig


def plot_history(history_csv: str | Path, path: str | Path) -> None:
    """Training curves from a run dir's history.csv, written to ``path``."""
    import csv

    with open(history_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{history_csv} has no epochs")
    fig = history_figure(rows)
    import matplotlib.pyplot as plt  # after history_figure chose the Agg backend

    fig.savefig(path)
    plt.close(fig)
