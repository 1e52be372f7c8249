"""wbc_batch.inference.local_engine: batches in this process or in worker processes, crash recovery; the classify() API."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, build_color_model, color_model_reference
from crashing_task import die_on_poison
from test_orchestrator import JPEG, read_rows

import wbc_batch
from wbc_batch.inference import isolation
from wbc_batch.inference import local_engine as runner
from wbc_batch.inference.discover import InputFile
from wbc_batch.inference.engine import RunnerOptions, chunks, run_batch
from wbc_batch.inference.local_engine import LocalEngine
from wbc_batch.inference.model import load_model
from wbc_batch.inference.orchestrator import ClassifyConfig, classify, run_classify
from wbc_batch.inference.pool import WorkerError
from wbc_batch.inference.predictions import sidecar_path
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


@pytest.mark.parametrize("options", [RunnerOptions(in_process=True, batch_size=6), RunnerOptions(workers=1, batch_size=6)])
def test_batches_keep_input_order_in_this_process_and_in_one_worker(model, sample_copy, options):
    files = _files(sample_copy)
    batches = list(iter_prediction_batches(files, model, options))
    assert [len(b) for b in batches] == [6] * 6 + [4]
    preds = [p for b in batches for p in b]
    assert [p.path for p in preds] == [f.rel for f in files]
    assert all(p.true_label == p.path.split("/")[0] for p in preds)


@pytest.mark.slow
def test_two_workers_give_the_same_predictions_as_this_process(model, sample_copy):
    files = _files(sample_copy)
    one = [asdict(p) for b in iter_prediction_batches(files, model, RunnerOptions(in_process=True, batch_size=5)) for p in b]
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
    truth = lambda rel: ""  # noqa: E731
    sched = runner._Scheduler(pool, LABELS, truth)
    dead: Future = Future()
    dead.set_exception(BrokenProcessPool("worker died"))
    queued: Future = Future()  # died with the old pool: must be sent again
    queued.set_exception(BrokenProcessPool("worker died"))
    sched.pending.extend([(files[:3], dead), (files[3:], queued)])
    preds = sched.finish()
    assert [p.status for p in preds] == ["ok", "error", "ok"]
    assert preds[1].error == "the decoding worker crashed on this file"
    # once for the batch, once when it died again alone, twice for the culprit alone (a second chance)
    assert pool.restarts == 4
    assert pool.submitted[:5] == [[f.path for f in files[:3]], [files[0].path], [files[1].path], [files[1].path], [files[2].path]]
    (batch, fut), = sched.pending
    assert batch == files[3:] and [p.status for p in to_predictions(batch, fut.result(), LABELS, truth)] == ["ok"] * 3


def test_an_innocent_batch_is_rerun_whole_not_file_by_file(model, sample_copy):
    files = _files(sample_copy)[:3]
    pool = _FakePool(model, culprit="nothing")
    sched = runner._Scheduler(pool, LABELS, lambda rel: "")
    dead: Future = Future()
    dead.set_exception(BrokenProcessPool("another batch killed the worker"))
    sched.pending.append((files, dead))
    assert [p.status for p in sched.finish()] == ["ok"] * 3
    assert pool.submitted == [[f.path for f in files]] and pool.restarts == 1


def test_workers_that_die_on_every_file_stop_the_run(model, sample_copy):
    files = _files(sample_copy)[:8]

    class _AllDie(_FakePool):
        def submit(self, paths):
            fut: Future = Future()
            fut.set_exception(BrokenProcessPool("worker died"))
            return fut

    sched = runner._Scheduler(_AllDie(model, culprit=""), LABELS, lambda rel: "")
    dead: Future = Future()
    dead.set_exception(BrokenProcessPool("worker died"))
    sched.pending.append((files, dead))
    with pytest.raises(WorkerError, match=r"worker processes died on 5 files in a row, each on its own \(last: EOSINOPHIL/"):
        sched.finish()


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


class _HereInFives:
    """An engine of its own: batches of five in this process; remembers the options it ran with and being closed."""

    def __init__(self) -> None:
        self.options, self.closed = None, 0

    def info(self):
        return {"name": "here"}

    def close(self) -> None:
        self.closed += 1

    def batches(self, files, model, options, truth):
        self.options = options
        for batch in chunks(files, 5):
            yield to_predictions(batch, run_batch(model, [f.path for f in batch]), model.labels, truth)


def test_classify_runs_on_the_engine_it_is_given_and_closes_it(model, sample_copy):
    engine, options = _HereInFives(), RunnerOptions(workers=3, batch_size=7)
    preds = list(wbc_batch.classify(sample_copy, model=model, options=options, engine=engine))
    assert engine.options is options and engine.closed == 1
    assert preds == list(classify(sample_copy, model=model, options=RunnerOptions(in_process=True, batch_size=7)))


def test_package_exposes_classify_lazily():
    assert wbc_batch.classify is classify
    assert wbc_batch.load_model is load_model
    assert "classify" in dir(wbc_batch)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wbc_batch.nope  # noqa: B018


# -- real worker processes that die ----------------------------------------------------------------------
def _run(tmp_path, inputs, color_model, engine, on_batch=None, batch_size=4, workers=2):
    cfg = ClassifyConfig(inputs=[str(inputs)], output=str(tmp_path / "p.csv"), model=str(color_model),
                         runner=RunnerOptions(workers=workers, batch_size=batch_size), progress="none")
    return run_classify(cfg, engine=engine, on_batch=on_batch), read_rows(tmp_path / "p.csv")


@pytest.mark.slow
def test_a_worker_killed_between_batches_costs_no_row(tmp_path, color_model, sample_copy):
    killed = []

    def kill_a_worker(preds):
        children = multiprocessing.active_children()  # none while a broken pool awaits its replacement
        if len(killed) < 2 and children:  # twice: the replacement pool must be as replaceable as the first
            os.kill(children[0].pid, signal.SIGKILL)
            children[0].join(5)
            killed.append(children[0].pid)
            time.sleep(0.3)  # the pool notices while the main process is between batches

    s, rows = _run(tmp_path, sample_copy, color_model, LocalEngine(), kill_a_worker, batch_size=2)
    assert len(killed) == 2
    assert (s.files, s.ok, s.errors) == (40, 40, 0)
    assert [r["path"] for r in rows] == [f.rel for f in _files(sample_copy)]
    assert json.loads(sidecar_path(tmp_path / "p.csv").read_text())["state"] == "finished"


@pytest.mark.slow
def test_only_the_poison_file_becomes_an_error_row(tmp_path, color_model, sample_copy):
    shutil.copy(JPEG, sample_copy / "EOSINOPHIL" / "_0_poison.jpeg")  # in the first batch, with healthy files
    s, rows = _run(tmp_path, sample_copy, color_model, LocalEngine(task=die_on_poison))
    assert [(r["path"], r["error"]) for r in rows if r["status"] == "error"] == [("EOSINOPHIL/_0_poison.jpeg", "the decoding worker crashed on this file")]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) and (s.files, s.ok, s.errors) == (41, 40, 1)
    m = load_model(color_model, threads=1)
    for r in rows[:6]:
        if r["status"] == "ok":
            np.testing.assert_allclose([float(r[f"prob_{lb}"]) for lb in LABELS], _expected(sample_copy / r["path"], m), atol=1e-5)


@pytest.mark.slow
def test_one_worker_isolates_a_file_that_crashes_the_decoder_too(tmp_path, color_model, sample_copy):
    """``workers=1`` (and the default on a one-core machine) runs in a worker process as well: a crash is one row, not the run."""
    shutil.copy(JPEG, sample_copy / "EOSINOPHIL" / "_0_poison.jpeg")
    s, rows = _run(tmp_path, sample_copy, color_model, LocalEngine(task=die_on_poison), workers=1)
    assert [(r["path"], r["error"]) for r in rows if r["status"] == "error"] == [("EOSINOPHIL/_0_poison.jpeg", "the decoding worker crashed on this file")]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) and (s.files, s.ok, s.errors) == (41, 40, 1)
    assert json.loads(sidecar_path(tmp_path / "p.csv").read_text())["state"] == "finished"


@pytest.mark.slow
def test_workers_dying_on_most_files_fail_the_run_loudly(tmp_path, color_model, monkeypatch):
    monkeypatch.setattr(isolation, "MAX_CRASHES_IN_A_ROW", 2)  # 5 in a real run; fewer restarts here
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        shutil.copy(JPEG, d / f"poison{i:02d}.jpeg")
    with pytest.raises(WorkerError, match="died on 2 files in a row") as e:
        _run(tmp_path, d, color_model, LocalEngine(task=die_on_poison))
    assert e.value.exit_code == 1
    assert json.loads(sidecar_path(tmp_path / "p.csv").read_text())["state"] == "failed"


@pytest.mark.slow
def test_a_model_file_replaced_mid_run_does_not_change_the_rows(tmp_path, color_model, sample_copy):
    model_file = tmp_path / "model.onnx"
    shutil.copy(color_model, model_file)
    original = load_model(model_file, threads=1)
    replaced = []

    def replace_and_kill(preds):
        children = multiprocessing.active_children()
        if not replaced and children:
            build_color_model(tmp_path / "other.onnx", labels=LABELS[::-1], height=16, width=16)
            os.replace(tmp_path / "other.onnx", model_file)
            for p in children:  # the replacement workers must not read the new file
                os.kill(p.pid, signal.SIGKILL)
            replaced.append(1)
            time.sleep(0.3)

    s, rows = _run(tmp_path, sample_copy, model_file, LocalEngine(), replace_and_kill)
    assert replaced and (s.files, s.ok) == (40, 40)
    for r in rows:
        np.testing.assert_allclose([float(r[f"prob_{lb}"]) for lb in LABELS], _expected(sample_copy / r["path"], original), atol=1e-5)
    assert json.loads(sidecar_path(tmp_path / "p.csv").read_text())["model"]["sha256"] == original.sha256 == s.model_sha256
