"""What ``wbc-batch adapt`` must reproduce, computed by torch itself: every batch norm re-measured on one batch (AdaBN)."""

from __future__ import annotations

import numpy as np


def remeasured_outputs(model, x) -> np.ndarray:
    """``model``'s outputs on ``x`` after each batch norm's statistics are re-measured on ``x`` in a single batch.

    Each layer is measured on the layers before it, already re-normalised (training mode), as adapt does
    layer by layer. torch stores the unbiased variance but normalised the batch by the biased one, as adapt
    does: the stored variance is scaled back.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    counts = {}
    hooks = [m.register_forward_hook(lambda m, i, o: counts.__setitem__(m, i[0].numel() // i[0].shape[1])) for m in bns]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for m in bns:
        m.running_var *= (counts[m] - 1) / counts[m]
    model.eval()
    with torch.inference_mode():
        return model(x).numpy()
