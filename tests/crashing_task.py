"""A worker task for tests: a real worker process dies (SIGKILL, as a decoder segfault or the OOM killer would) on a chosen file.

A module of its own so that spawned worker processes can import it by name.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from wbc_batch.inference.pool import work
from wbc_batch.inference.rows import BatchResult


def die_on_poison(paths: Sequence[str]) -> BatchResult:
    """Kill this worker when the batch holds a file whose name contains "poison"; else the real task."""
    if any("poison" in os.path.basename(p) for p in paths):
        os.kill(os.getpid(), signal.SIGKILL)
    return work(paths)
