"""wbc_batch.inference.local_engine: batches in this process or in worker processes, crash recovery; the classify() API."""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, color_model_reference

import wbc_batch
from wbc_batch.inference import local_engine as runner
from wbc_batch.inference.discover import InputFile
from wbc_batch.inference.engine import RunnerOptions, run_batch
from wbc_batch.inference.local_engine import LocalEngine
from wbc_batch.inference.model import load_model
from wbc_batch.inference.orchestrator import classify
from wbc_batch.inference.preprocess import load_image
from wbc_batch.inference.rows import Prediction, to_predictions
from wbc_batch.inference.truth import truth_function


@pytest.fixture(scope="module")
def model(color_model):
    return load_model(color_model, threads=1)


def _expected(path: Path, model) -> np.ndarray:
    return color_model_reference(load_image(path, model.metadata.preprocess)[None])[0]


def iter_prediction_batches(files, model, options):
    """The local engine's batches, true labels from class-named folders."""
    return LocalEngine().batches(files, model, options, truth_function(LABELS))


def _files(root: Path) -> list[InputFile]:
    return [InputFile(str(p), p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.jpeg"))]


def test_in_process_batches_keep_input_order(model, sample_copy):
    files = _files(sample_copy)
    batches = list(iter_prediction_batches(files, model, RunnerOptions(workers=1, batch_size=6)))
    assert [len(b) for b in batches] == [6] * 6 + [4]
    preds = [p for b in batches for p in b]
    assert [p.path for p in preds] == [f.rel for f in files]
    assert all(p.true_label == p.path.split("/")[0] for p in preds)


@pytest.mark.slow
def test_two_workers_give_the_same_predictions_as_one(model, sample_copy):
    files = _files(sample_copy)
    one = [asdict(p) for b in iter_prediction_batches(files, model, RunnerOptions(workers=1, batch_size=5)) for p in b]
    two = [asdict(p) for b in iter_prediction_batches(files, model, RunnerOptions(workers=2, batch_size=5)) for p in b]
    assert len(one) == 40 and one == two


@pytest.mark.slow
def test_stopping_early_shuts_the_pool_down(model, sample_copy):
    gen = iter_prediction_batches(_files(sample_copy), model, RunnerOptions(workers=2, batch_size=2))
    assert len(next(gen)) == 2
    t = time.perf_counter()
    gen.close()
    assert time.perf_counter() - t < 30


class _FakePool:
    """Runs batches in this process; a batch holding ``culprit`` "kills its worker"."""

    def __init__(self, model, culprit: str) -> None:
        self.model, self.culprit, self.restarts, self.submitted = model, culprit, 0, []

    def submit(self, paths):
        self.submitted.append(list(paths))
        fut: Future = Future()
        if self.culprit in paths:
            fut.set_exception(BrokenProcessPool("worker died"))
        else:
            fut.set_result(run_batch(self.model, paths))
        return fut

    def restart(self) -> None:
        self.restarts += 1


def test_dead_worker_costs_only_the_culprit_row(model, sample_copy):
    files = _files(sample_copy)[:6]
    pool = _FakePool(model, culprit=files[1].path)
    dead: Future = Future()
    dead.set_exception(BrokenProcessPool("worker died"))
    queued: Future = Future()  # died with the old pool: must be sent again
    queued.set_exception(BrokenProcessPool("worker died"))
    pending = deque([(files[:3], dead), (files[3:], queued)])
    truth = lambda rel: ""  # noqa: E731
    preds = runner._finish(pending, pool, LABELS, truth)
    assert [p.status for p in preds] == ["ok", "error", "ok"]
    assert preds[1].error == "the decoding worker crashed on this file"
    assert pool.restarts == 2  # once for the batch, once for the culprit
    (batch, fut), = pending
    assert batch == files[3:] and [p.status for p in to_predictions(batch, fut.result(), LABELS, truth)] == ["ok"] * 3


def test_classify_api_yields_one_prediction_per_file(color_model, sample_copy):
    (sample_copy / "bad.jpg").write_bytes(b"")
    preds = list(classify([sample_copy], model=color_model, options=RunnerOptions(workers=1, batch_size=7)))
    assert len(preds) == 41 and all(isinstance(p, Prediction) for p in preds)
    assert preds[0].path == "EOSINOPHIL/_0_1616.jpeg" and preds[0].true_label == "EOSINOPHIL"
    bad = [p for p in preds if p.status == "error"]
    assert [(p.path, p.error) for p in bad] == [("bad.jpg", "empty file")]
    m = load_model(color_model, threads=1)
    for p in preds[:5]:
        np.testing.assert_allclose(p.probabilities, _expected(sample_copy / p.path, m), atol=1e-5)
        assert p.label == LABELS[int(np.argmax(p.probabilities))] and p.confidence == max(p.probabilities)


def test_classify_accepts_a_single_path_a_loaded_model_and_a_truth_function(model, sample_copy, monkeypatch):
    folder = sample_copy / "MONOCYTE"
    monkeypatch.chdir(sample_copy)  # relative: were the string taken letter by letter, no "/" gets walked
    preds = list(classify("MONOCYTE", model=model, options=RunnerOptions(workers=1), truth=lambda rel: "NEUTROPHIL"))
    assert [p.path for p in preds] == sorted(os.listdir(folder))
    assert {p.true_label for p in preds} == {"NEUTROPHIL"}
    assert len(list(classify(folder, model=model, options=RunnerOptions(workers=1)))) == 10


def test_package_exposes_classify_lazily():
    assert wbc_batch.classify is classify
    assert wbc_batch.load_model is load_model
    assert "classify" in dir(wbc_batch)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wbc_batch.nope  # noqa: B018
