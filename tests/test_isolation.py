"""wbc_batch.inference.isolation: the crash policy both engines share (which files to rerun, the culprit's row, a broken setup)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LABELS

from wbc_batch.inference import isolation
from wbc_batch.inference.discover import InputFile
from wbc_batch.inference.isolation import CRASHED, Crashed, CrashIsolation, halves, one_by_one
from wbc_batch.inference.rows import BatchResult, to_predictions

FILES = [InputFile(f"/r/{i}.jpg", f"{i}.jpg") for i in range(8)]
TRUTH = lambda rel: ""  # noqa: E731


class _Workers:
    """Attempts that die whenever a part holds a poison file (after yielding the rows of the files before it, a batch of 2 at a time)."""

    def __init__(self, poison: set[str], batch: int = 2) -> None:
        self.poison, self.batch, self.tried = poison, batch, []

    def attempt(self, part):
        self.tried.append([f.rel for f in part])
        for b0 in range(0, len(part), self.batch):
            chunk = part[b0 : b0 + self.batch]
            if any(f.rel in self.poison for f in chunk):
                raise Crashed(b0, RuntimeError(f"died on {chunk[0].rel}"))
            yield to_predictions(chunk, BatchResult(np.full((len(chunk), 4), 0.25, np.float32), [None] * len(chunk)), LABELS, TRUTH)


def _broken(f, n, cause):
    return RuntimeError(f"{n} in a row, last {f.rel}: {cause}")


@pytest.mark.parametrize("narrow", [one_by_one, halves])
def test_only_the_culprit_is_an_error_row_and_rows_keep_input_order(narrow):
    workers = _Workers({"5.jpg"})
    rows = [p for b in CrashIsolation(LABELS, TRUTH, _broken, narrow).isolate(FILES, workers.attempt) for p in b]
    assert [p.path for p in rows] == [f.rel for f in FILES]
    assert [(p.path, p.error) for p in rows if p.status == "error"] == [("5.jpg", CRASHED)]


def test_a_part_that_died_is_narrowed_from_the_first_file_without_a_row():
    workers = _Workers({"5.jpg"})
    list(CrashIsolation(LABELS, TRUTH, _broken, halves).isolate(FILES, workers.attempt))
    # 0-3 had their rows before the death: only 4-7 are tried again, by halves
    assert workers.tried == [[f"{i}.jpg" for i in range(8)], ["4.jpg", "5.jpg"], ["4.jpg"], ["5.jpg"], ["6.jpg", "7.jpg"]]


def test_one_by_one_tries_each_remaining_file_alone():
    workers = _Workers({"5.jpg"})
    list(CrashIsolation(LABELS, TRUTH, _broken).isolate(FILES[4:], workers.attempt))
    assert workers.tried == [["4.jpg", "5.jpg", "6.jpg", "7.jpg"], ["4.jpg"], ["5.jpg"], ["6.jpg"], ["7.jpg"]]


def test_files_dying_in_a_row_are_a_broken_setup(monkeypatch):
    monkeypatch.setattr(isolation, "MAX_CRASHES_IN_A_ROW", 3)
    workers = _Workers({f.rel for f in FILES[2:]})
    policy = CrashIsolation(LABELS, TRUTH, _broken, halves)
    got = []
    with pytest.raises(RuntimeError, match=r"^3 in a row, last 4\.jpg: died on 4\.jpg$") as e:
        for b in policy.isolate(FILES, workers.attempt):
            got += b
    assert isinstance(e.value.__cause__, RuntimeError)
    assert [(p.path, p.status) for p in got] == [("0.jpg", "ok"), ("1.jpg", "ok"), ("2.jpg", "error"), ("3.jpg", "error")]


def test_a_batch_that_passes_resets_the_count(monkeypatch):
    monkeypatch.setattr(isolation, "MAX_CRASHES_IN_A_ROW", 2)
    policy = CrashIsolation(LABELS, TRUTH, _broken)
    assert policy.culprit(FILES[0])[0].error == CRASHED and policy.in_a_row == 1
    policy.passed()
    assert policy.culprit(FILES[1])[0].error == CRASHED
    with pytest.raises(RuntimeError, match="2 in a row, last 2.jpg"):
        policy.culprit(FILES[2])


def test_a_death_after_every_row_costs_no_row():
    def attempt(part):
        yield to_predictions(part, BatchResult(np.full((len(part), 4), 0.25, np.float32), [None] * len(part)), LABELS, TRUTH)
        raise Crashed(len(part))

    rows = [p for b in CrashIsolation(LABELS, TRUTH, _broken).isolate(FILES[:3], attempt) for p in b]
    assert [p.status for p in rows] == ["ok"] * 3
