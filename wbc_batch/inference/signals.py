"""One signal policy for a run: the first SIGINT or SIGTERM stops it; the ones after cannot cut the cleanup short.

Why: Python's default turns SIGINT into a KeyboardInterrupt *wherever* the main thread is,
again at every further Ctrl-C, so a second one lands in the middle of the cleanup (ending the
workers, the last flush, the sidecar) and a run hangs on its workers or leaves them behind; and
SIGTERM (a scheduler's stop, ``kill``) ends the process with no cleanup at all. Under
:func:`stop_on_signals` the first of either raises :class:`Interrupted` in the main thread (so a
wait on a slow batch is cut at once), and every later one is only counted.

A batch's write and its count in the summary are one step (:meth:`StopState.critical`): a
signal arriving during it takes effect right after, so the CSV and the summary never disagree.
So is a run's start-up from the first change to its output to its first batch
(:meth:`StopState.hold`): the sidecar then says ``interrupted`` with the counts of the CSV.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by ``signum`` (a KeyboardInterrupt, so code that handles Ctrl-C handles it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class StopState:
    """Which signal stopped the run (0: none yet) and how many arrived."""

    signum: int = 0
    count: int = 0
    _deferred: bool = False  # inside a critical step
    _owed: bool = False  # the stop signal arrived during one: raise when it ends

    def handle(self, signum: int, frame: object = None) -> None:
        self.count += 1
        if self.signum:
            return  # already stopping: the cleanup must run to its end
        self.signum = signum
        if self._deferred:
            self._owed = True
        else:
            raise Interrupted(signum)

    def stopping(self) -> None:
        """The run is ending (however): signals from now on are only counted, never raised."""
        self._deferred = True
        self._owed = False

    def hold(self) -> None:
        """A step no signal may split begins; a stop signal from now on is kept until :meth:`release`.

        For a step that ends elsewhere than it began (a run's start-up, ended by its loop, which takes the
        signal as its first event); :meth:`critical` is the same for a block.
        """
        self._deferred = True

    def release(self) -> None:
        """The step begun by :meth:`hold` is over: a stop signal that arrived during it is raised now."""
        self._deferred = False
        if self._owed:
            self._owed = False
            raise Interrupted(self.signum)

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A step no signal may split; one that arrives during it is raised when it ends."""
        self.hold()
        try:
            yield
        except BaseException:
            self._deferred = False
            raise
        self.release()


@contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopState]:
    """Handle ``signals`` as above while the block runs (in the main thread only; elsewhere Python allows no handler)."""
    state = StopState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {s: signal.signal(s, state.handle) for s in signals}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
