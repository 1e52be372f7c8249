"""wbc_batch.inference.local_engine: batches, worker processes, crash recovery and the classify() API."""

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
from conftest import LABELS, color_model_reference, sample_images

import wbc_batch
from wbc_batch.inference import local_engine as runner
from wbc_batch.inference.discover import InputFile
from wbc_batch.inference.local_engine import RunnerOptions, chunks, classify, iter_prediction_batches, run_batch, to_predictions
from wbc_batch.inference.model import load_model
from wbc_batch.inference.predictions import Prediction
from wbc_batch.inference.preprocess import load_image


@pytest.fixture(scope="module")
def model(color_model):
    return load_model(color_model, threads=1)


def _expected(path: Path, model) -> np.ndarray:
    return color_model_reference(load_image(path, model.metadata.preprocess)[None])[0]


def test_run_batch_mixes_good_and_bad_files(model, tmp_path):
    good = sample_images()[:3]
    (tmp_path / "bad.jpg").write_text("nope")
    paths = [str(good[0]), str(tmp_path / "bad.jpg"), str(good[1]), str(tmp_path / "missing.jpg"), str(good[2])]
    res = run_batch(model, paths)
    assert res.errors == [None, "not an image (format not recognised)", None, "unreadable: No such file or directory", None]
    assert res.probabilities.shape == (3, 4)
    for row, p in zip(res.probabilities, good, strict=True):
        np.testing.assert_allclose(row, _expected(p, model), atol=1e-6)


def test_run_batch_all_bad(model, tmp_path):
    res = run_batch(model, [str(tmp_path / "a.jpg")])
    assert res.probabilities.shape == (0, 4) and res.errors == ["unreadable: No such file or directory"]


def test_a_decoder_bug_costs_one_row(model, monkeypatch):
    def explode(path, spec):
        if path.endswith("_1_1414.jpeg"):
            raise MemoryError("boom")
        return load_image(path, spec)

    monkeypatch.setattr(runner, "load_image", explode)
    res = run_batch(model, [str(p) for p in sample_images()[:3]])
    assert res.errors == [None, "decoder failed: MemoryError: boom", None]


def test_to_predictions(model):
    files = [InputFile("/r/EOSINOPHIL/a.jpg", "EOSINOPHIL/a.jpg"), InputFile("/r/b.jpg", "b.jpg")]
    probs = np.array([[0.1, 0.2, 0.6, 0.1]], np.float32)
    res = runner.BatchResult(probs, [None, "empty file"])
    got = to_predictions(files, res, LABELS, lambda rel: rel.upper()[:3])
    assert got[0] == Prediction("EOSINOPHIL/a.jpg", "MONOCYTE", pytest.approx(0.6), pytest.approx([0.1, 0.2, 0.6, 0.1]), "EOS", "ok", "")
    assert got[1] == Prediction("b.jpg", "", None, None, "B.J", "error", "empty file")


def test_chunks():
    assert list(chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []


def test_runner_options(monkeypatch):
    monkeypatch.setattr(runner, "available_cores", lambda: 8)
    assert RunnerOptions().resolved_workers() == 8 and RunnerOptions().session_threads() == 1
    assert RunnerOptions(workers=1).session_threads() == 8
    assert RunnerOptions(workers=3).session_threads() == 2
    assert RunnerOptions(workers=16).session_threads() == 1
    assert RunnerOptions(workers=2, threads=5).session_threads() == 5


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
