"""Crash isolation, one policy for every engine: a file that kills the process decoding it costs its own row.

A worker process that dies (a decoder segfault, the OOM killer) takes its whole batch with it, and
says nothing about which file did it. Each engine knows how to run files again in isolation (the
local engine: alone in a fresh pool; Ray: a new dataset on restarted actors) and gives that as an
*attempt*; :func:`isolate` decides which files to try next, and what a death means for their rows:

* a part that passes is innocent: its rows are the real ones;
* a part that dies is narrowed down (the engine says how: file by file, or by halves) until one file
  dies on its own, the culprit: its row is the error :data:`CRASHED`, the others keep theirs;
* files that die on their own :data:`MAX_CRASHES_IN_A_ROW` times in a row are not bad files but a
  broken setup (no memory, a lost cluster): the engine's error stops the run (rows written so far are kept).

Why a module of its own: the engines import it, and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .discover import InputFile
from .rows import BatchResult, Prediction, TruthFn, to_predictions

#: The error row of a file that killed its worker on its own.
CRASHED = "the decoding worker crashed on this file"
#: Files in a row that kill their worker on their own before the run is declared broken (not the files).
MAX_CRASHES_IN_A_ROW = 5


class Crashed(Exception):
    """An attempt's worker died; the first ``done`` files of the attempt already have their rows (yielded)."""

    def __init__(self, done: int = 0, cause: BaseException | None = None) -> None:
        super().__init__(str(cause or "the worker died"))
        self.done, self.cause = done, cause


#: Runs files again in isolation: their rows, a list per batch, or :class:`Crashed` when a worker died.
Attempt = Callable[[Sequence[InputFile]], Iterator[list[Prediction]]]
#: How a part that died is narrowed: the smaller parts to try, in input order.
Narrow = Callable[[Sequence[InputFile]], list[Sequence[InputFile]]]
#: The engine's error for a broken setup: (the last culprit, crashes in a row, what the worker's death said).
Broken = Callable[[InputFile, int, BaseException | None], Exception]


def one_by_one(files: Sequence[InputFile]) -> list[Sequence[InputFile]]:
    return [[f] for f in files]


def halves(files: Sequence[InputFile]) -> list[Sequence[InputFile]]:
    return [files[: len(files) // 2], files[len(files) // 2 :]]


def crashed_rows(files: Sequence[InputFile], labels: Sequence[str], truth: TruthFn) -> list[Prediction]:
    """The rows of files that killed their worker: each one the :data:`CRASHED` error."""
    return to_predictions(files, BatchResult.failed([CRASHED] * len(files), len(labels)), labels, truth)


@dataclass
class CrashIsolation:
    """One run's crash policy: the files that died on their own in a row, and what the rows of a dead part are.

    ``broken`` makes the engine's error; ``narrow`` (default :func:`one_by_one`) splits a part that died.
    """

    labels: Sequence[str]
    truth: TruthFn
    broken: Broken
    narrow: Narrow = one_by_one
    in_a_row: int = 0

    def passed(self) -> None:
        """A batch came back: the files that died before it were not a broken setup."""
        self.in_a_row = 0

    def isolate(self, files: Sequence[InputFile], attempt: Attempt) -> Iterator[list[Prediction]]:
        """Rows of ``files`` in input order, a list per batch: each part by ``attempt``, a part that dies narrowed down
        (:attr:`narrow`) to the files that die alone, each of which is one :data:`CRASHED` row."""
        todo: list[Sequence[InputFile]] = [files]
        while todo:
            part = todo.pop()
            try:
                for rows in attempt(part):
                    self.passed()
                    yield rows
                continue
            except Crashed as e:
                rest, cause = part[e.done :], e.cause
            if len(rest) > 1:
                todo += reversed(self.narrow(rest))
            elif rest:
                yield self.culprit(rest[0], cause)

    def culprit(self, f: InputFile, cause: BaseException | None = None) -> list[Prediction]:
        """``f`` killed its worker on its own: its error row, or the engine's error when too many did in a row."""
        self.in_a_row += 1
        if self.in_a_row >= MAX_CRASHES_IN_A_ROW:
            raise self.broken(f, self.in_a_row, cause) from cause
        return crashed_rows([f], self.labels, self.truth)
