"""Matplotlib figures shared by training (validation matrix) and reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: str | Path, *, normalized: bool = False, title: str = "") -> None:
    """Confusion matrix with class names on both axes and the value in every cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import normalize_rows

    values = normalize_rows(cm) if normalized else np.asarray(cm)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 2), dpi=110)
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
            ax.text(j, i, f"{v:.2f}" if normalized else f"{int(v)}", ha="center", va="center", color="white" if v > hi else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
