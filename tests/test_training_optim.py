"""Optimiser and schedule factories: every schedule runs for any number of steps a real run can have."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from wbc_batch.training.optim import build_optimizer, build_scheduler  # noqa: E402


def _lrs(name: str, total: int, lr: float = 1e-3) -> list[float]:
    opt = build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], lr, 0.0)
    sched = build_scheduler(name, opt, lr, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


@pytest.mark.parametrize("total", range(1, 13))
@pytest.mark.parametrize("name", ["onecycle", "cosine", "constant"])
def test_a_tiny_run_gets_a_schedule_that_runs(name, total):
    # 1 epoch of 275 images at batch 64 is 5 steps: one-cycle's 20% warm-up was 0 steps long, and torch
    # divided by it (ZeroDivisionError) before the first batch.
    lrs = _lrs(name, total)
    assert len(lrs) == total and all(0 < v <= 1e-3 + 1e-12 for v in lrs)


def test_one_cycle_of_a_normal_run_is_unchanged():
    lrs = _lrs("onecycle", 100)
    assert max(range(100), key=lrs.__getitem__) == 19 and lrs[19] == pytest.approx(1e-3)  # peak after 20% of the steps
    assert lrs[0] == pytest.approx(1e-3 / 25) and lrs[-1] < 1e-6
