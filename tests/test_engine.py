"""wbc_batch.inference.engine: the batch every engine executes, run options, and the Engine interface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import color_model_reference, sample_images

from wbc_batch.inference import engine
from wbc_batch.inference.engine import Engine, RunnerOptions, chunks, run_batch
from wbc_batch.inference.local_engine import LocalEngine
from wbc_batch.inference.model import load_model
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

    monkeypatch.setattr(engine, "load_image", explode)
    res = run_batch(model, [str(p) for p in sample_images()[:3]])
    assert res.errors == [None, "decoder failed: MemoryError: boom", None]


def test_chunks():
    assert list(chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []


def test_runner_options(monkeypatch):
    monkeypatch.setattr(engine, "available_cores", lambda: 8)
    assert RunnerOptions().resolved_workers() == 8 and RunnerOptions().session_threads() == 1
    assert RunnerOptions(workers=1).session_threads() == 8
    assert RunnerOptions(workers=3).session_threads() == 2
    assert RunnerOptions(workers=16).session_threads() == 1
    assert RunnerOptions(workers=2, threads=5).session_threads() == 5
    assert RunnerOptions(workers=4, in_process=True).resolved_workers() == 1 and RunnerOptions(in_process=True).session_threads() == 8


def test_local_engine_is_an_engine():
    local = LocalEngine()
    assert isinstance(local, Engine)
    assert local.info() == {"name": "local"}
    local.close()
    local.close()  # twice is fine


def test_engines_import_neither_truth_nor_the_csv_writer():
    """The orchestrator hands engines a truth function; the rows they build are written elsewhere."""
    code = (
        "import sys, wbc_batch.inference.engine, wbc_batch.inference.local_engine, wbc_batch.inference.ray_engine; "
        "print(sorted(m for m in ('wbc_batch.inference.truth', 'wbc_batch.inference.predictions') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_run_batch_gives_the_domain_check_of_a_model_that_has_one(trust_model, tmp_path):
    from conftest import TRUST_OUT_OF_DOMAIN, trust_reference

    m = load_model(trust_model, threads=1)
    good = sample_images()
    (tmp_path / "bad.jpg").write_text("nope")
    res = run_batch(m, [str(good[0]), str(tmp_path / "bad.jpg"), *map(str, good[1:])])
    probs, scores = trust_reference(trust_model, good)
    np.testing.assert_array_equal(res.probabilities, probs)
    np.testing.assert_array_equal(res.values["ood_score"], scores)
    inside = res.values["in_domain"]
    assert inside.tolist() == (scores <= m.metadata.domain.threshold).tolist() and int((~inside).sum()) == TRUST_OUT_OF_DOMAIN


def test_run_batch_gives_the_same_value_names_when_no_file_decodes(trust_model, tmp_path):
    """Every batch of a model has the same values (Ray stacks the batches' answers), empty when nothing decoded."""
    res = run_batch(load_model(trust_model, threads=1), [str(tmp_path / "missing.jpg")])
    assert sorted(res.values) == ["in_domain", "ood_score"]
    assert (res.values["ood_score"].dtype, res.values["in_domain"].dtype, len(res.values["ood_score"])) == (np.float32, np.bool_, 0)


def test_run_batch_of_an_older_model_has_no_scores(model):
    res = run_batch(model, [str(sample_images()[0])])
    assert res.values == {}
