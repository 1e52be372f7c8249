"""Optimiser and learning-rate schedule factories (as timm's ``create_optimizer`` / ``create_scheduler``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (default), Adam, or SGD with Nesterov momentum 0.9."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def build_scheduler(name: str, opt: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step schedule over ``total_steps``: one-cycle (20% warm-up), cosine, or none (constant)."""
    if name == "onecycle":
        # torch ends the warm-up at pct_start * total_steps - 1 and divides by that: it must be at least one step
        # (a 5-step run, e.g. one epoch of 275 images, had a 0-step warm-up and failed before its first batch).
        if total_steps < 3:  # no room for both a warm-up and a decay step: the peak rate throughout
            return None
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=max(0.2, 2.0 / total_steps))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if name == "constant":
        return None
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")
