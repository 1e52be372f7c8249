"""The Ray engine (--engine ray) writes the same CSV as the local engine.

Marked ``ray`` (tox env ``ray``); skipped where ray is not installed. One small local Ray
cluster (2 CPUs, so two actor processes, on 127.0.0.1) serves the in-process tests; the CLI
tests start their own private Ray, or join that cluster with --address.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE

from wbc_batch.inference.local_engine import RunnerOptions
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify
from wbc_batch.inference.predictions import PROB_PREFIX

try:
    import ray
except ImportError:
    ray = None

requires_ray = pytest.mark.skipif(ray is None, reason="ray is not installed: pip install '.[ray]' in the checkout, or run scripts/test -e ray")


def _env() -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of two worker CPUs on loopback, shared by this module's in-process tests."""
    if ray is None:
        pytest.skip("ray is not installed")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]  # the workers import wbc_batch too
    from wbc_batch.inference.ray_engine import _loopback_only

    _loopback_only()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def mixed_input(tmp_path) -> Path:
    """sample_data/ plus a folder of files that cannot be classified, and a non-UTF-8 file name."""
    root = tmp_path / "in"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("README*"))
    bad = root / "bad"
    bad.mkdir()
    jpeg = sorted(SAMPLE.rglob("*.jpeg"))[0].read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_bytes(b"this is not an image\n" * 20)
    (bad / "ok_copy.jpeg").write_bytes(jpeg)
    if sys.platform != "darwin":  # APFS refuses non-UTF-8 names
        with open(os.path.join(os.fsencode(bad), b"caf\xe9.jpeg"), "wb") as f:
            f.write(jpeg)
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [r["path"] for r in ra] == [r["path"] for r in rb]  # same files, same order
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            if k.startswith(PROB_PREFIX) or k == "confidence":
                if x[k] == "" or y[k] == "":
                    assert x[k] == y[k], (x["path"], k)
                else:
                    assert abs(float(x[k]) - float(y[k])) <= 1e-5, (x["path"], k, x[k], y[k])
            else:
                assert x[k] == y[k], (x["path"], k, x[k], y[k])


def _classify(inputs, out: Path, model: Path, engine=None, **kw) -> object:
    opts = RunnerOptions(workers=kw.pop("workers", 1), batch_size=kw.pop("batch_size", 8))
    cfg = ClassifyConfig(inputs=[str(p) for p in inputs], output=str(out), model=str(model), runner=opts, progress="none", **kw)
    return run_classify(cfg, engine=engine)


def test_local_path_never_imports_ray(tmp_path, color_model):
    """Runs everywhere (not marked ray): the local engine must not pull ray in."""
    code = (
        "import sys; from wbc_batch.cli import main\n"
        f"sys.argv = ['wbc-batch', 'classify', {str(SAMPLE)!r}, '-m', {str(color_model)!r}, '-o', {str(tmp_path / 'p.csv')!r}, '--workers', '1', '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'ray' not in sys.modules, 'the local path imported ray'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), timeout=120)


@pytest.mark.ray
@requires_ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_matches_local_including_corrupt_files(tmp_path, color_model, mixed_input):
    from wbc_batch.inference.ray_engine import RayEngine

    local = tmp_path / "local.csv"
    s_local = _classify([mixed_input], local, color_model)
    engine = RayEngine()
    viaray = tmp_path / "ray.csv"
    s_ray = _classify([mixed_input], viaray, color_model, engine=engine, workers=2)
    _assert_same_rows(local, viaray)
    assert (s_ray.files, s_ray.ok, s_ray.errors) == (s_local.files, s_local.ok, s_local.errors)
    assert s_ray.errors == 3 and s_ray.files == 40 + 4 + (sys.platform != "darwin")
    errors = {r["path"]: r["error"] for r in _rows(viaray) if r["status"] == "error"}
    assert errors["bad/empty.jpg"] == "empty file"
    assert errors["bad/truncated.jpg"].startswith("truncated image")
    assert errors["bad/notes.jpg"].startswith("not an image")
    side = json.loads(Path(str(viaray) + ".run.json").read_text())
    assert side["engine"]["name"] == "ray" and side["engine"]["actors"] == 2 and side["state"] == "finished"
    assert side["engine"]["nodes"] == ["127.0.0.1"]
    assert engine.startup_s == 0.0  # Ray was already running: used, not restarted


def _crash_once_predictor(marker: str):
    """A Predictor whose process dies (os._exit) on the first batch any actor gets, once per marker."""
    from wbc_batch.inference.ray_engine import Predictor

    class CrashOncePredictor(Predictor):
        def __call__(self, batch):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().__call__(batch)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(1)  # the actor process dies with the batch in hand

    return CrashOncePredictor


@pytest.mark.ray
@requires_ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_worker_killed_mid_run_loses_no_row(tmp_path, color_model, mixed_input):
    from wbc_batch.inference.ray_engine import RayEngine

    marker = tmp_path / "crashed"
    local = tmp_path / "local.csv"
    _classify([mixed_input], local, color_model)
    engine = RayEngine(predictor_cls=_crash_once_predictor(str(marker)), max_restarts=2, max_task_retries=2)
    viaray = tmp_path / "ray.csv"
    _classify([mixed_input], viaray, color_model, engine=engine, workers=2, batch_size=4)
    assert marker.exists(), "no actor was killed: the test did not test anything"
    _assert_same_rows(local, viaray)


@pytest.mark.ray
@requires_ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_resume_skips_finished_files(tmp_path, color_model, mixed_input):
    from wbc_batch.inference.ray_engine import RayEngine

    full = tmp_path / "full.csv"
    _classify([mixed_input], full, color_model)
    # A run that stopped after 17 rows (plus a torn line), with its sidecar.
    part = tmp_path / "part.csv"
    _classify([mixed_input], part, color_model)
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:18]) + lines[18][:10])
    summary = _classify([mixed_input], part, color_model, engine=RayEngine(), workers=2, resume=True)
    assert summary.resumed == 17
    assert summary.processed == len(lines) - 1 - 17
    _assert_same_rows(full, part)
    # Nothing left: a second resume processes nothing (and need not start anything).
    again = _classify([mixed_input], part, color_model, engine=RayEngine(), workers=2, resume=True)
    assert again.processed == 0 and again.resumed == len(lines) - 1
    _assert_same_rows(full, part)


@pytest.mark.ray
@requires_ray
@pytest.mark.slow
@pytest.mark.parametrize("join", [False, True], ids=["private-local-ray", "join-with-address"])
def test_cli_engine_ray(tmp_path, color_model, mixed_input, ray_cluster, join):
    """The CLI end to end: its own loopback Ray, or --address to a running cluster."""
    local = tmp_path / "local.csv"
    _classify([mixed_input], local, color_model)
    out = tmp_path / "ray.csv"
    cmd = [sys.executable, "-m", "wbc_batch", "classify", str(mixed_input), "-m", str(color_model), "-o", str(out),
           "--engine", "ray", "--workers", "2", "--batch-size", "8"]
    if join:
        cmd += ["--address", ray_cluster]
    env = _env()
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "files 45" in r.stderr or "files 44" in r.stderr
    _assert_same_rows(local, out)
    side = json.loads(Path(str(out) + ".run.json").read_text())
    assert side["engine"]["nodes"] == ["127.0.0.1"]  # loopback only, whether started or joined


def _always_crash_predictor(name: str):
    """A Predictor whose process dies every time it gets the batch holding ``name``."""
    from wbc_batch.inference.ray_engine import Predictor

    class AlwaysCrashPredictor(Predictor):
        def __call__(self, batch):
            if any(os.fsdecode(bytes(p)).endswith(name) for p in batch["path"]):
                os._exit(1)
            return super().__call__(batch)

    return AlwaysCrashPredictor


@pytest.mark.ray
@requires_ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ray_file_that_always_kills_its_worker_is_one_error_row(tmp_path, color_model, mixed_input):
    """Retries are bounded, and then the batch is narrowed down: only the culprit is an error row, as locally."""
    from wbc_batch.inference.ray_engine import RayEngine

    local = tmp_path / "local.csv"
    _classify([mixed_input], local, color_model)
    engine = RayEngine(predictor_cls=_always_crash_predictor("notes.jpg"), max_restarts=1, max_task_retries=1)
    out = tmp_path / "ray.csv"
    s = _classify([mixed_input], out, color_model, engine=engine, workers=2, batch_size=4)
    want = _rows(local)
    for r in want:
        if r["path"] == "bad/notes.jpg":
            r["error"] = "the decoding worker crashed on this file"
    assert _rows(out) == want
    assert (s.files, s.errors) == (len(want), 3)
    assert json.loads(Path(str(out) + ".run.json").read_text())["state"] == "finished"


@pytest.mark.ray
@requires_ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ray_actors_dying_on_every_file_fail_the_run_not_hang(tmp_path, color_model, mixed_input):
    """A cluster on which every batch dies is not a folder of bad files: the run stops with a clear error."""
    from wbc_batch.inference.ray_engine import RayEngine, RayEngineError

    engine = RayEngine(predictor_cls=_always_crash_predictor(""), max_restarts=0, max_task_retries=0)
    out = tmp_path / "ray.csv"
    with pytest.raises(RayEngineError, match=r"retries, on 5 files in a row, each on its own \(last: "):
        _classify([mixed_input], out, color_model, engine=engine, workers=2, batch_size=4)
    rows = _rows(out)
    assert len(rows) == 4 and all(r["error"] == "the decoding worker crashed on this file" for r in rows)


@pytest.mark.ray
@requires_ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_matches_local_with_a_domain_check(tmp_path, trust_model, mixed_input):
    from wbc_batch.inference.ray_engine import RayEngine

    local, viaray = tmp_path / "local.csv", tmp_path / "ray.csv"
    s_local = _classify([mixed_input], local, trust_model)
    s_ray = _classify([mixed_input], viaray, trust_model, engine=RayEngine(), workers=2)
    _assert_same_rows(local, viaray)
    assert s_ray.out_of_domain == s_local.out_of_domain > 0
    assert {"risk", "ood_score", "in_domain"} <= set(_rows(viaray)[0])


def test_ray_actor_answer_carries_the_domain_check_to_the_rows(tmp_path, trust_model, color_model):
    """What a Predictor actor returns, re-sequenced into rows (here from reversed order, cut in batches of 4), equals the
    local rows (no Ray needed to check)."""
    import numpy as np

    from wbc_batch.inference.discover import InputFile
    from wbc_batch.inference.engine import run_batch
    from wbc_batch.inference.model import load_model
    from wbc_batch.inference.ray_engine import Predictor, _rows
    from wbc_batch.inference.rows import to_predictions

    (tmp_path / "bad.jpg").write_bytes(b"")
    files = [InputFile(str(p), p.name) for p in [*sorted(SAMPLE.rglob("*.jpeg"))[:5], tmp_path / "bad.jpg"]]
    for path, domain in ((trust_model, True), (color_model, False)):
        model = load_model(path)
        actor = Predictor([model.data], model.sha256, "cpu", 1)
        out = actor({"idx": np.arange(6)[::-1], "path": np.array([os.fsencode(f.path) for f in files[::-1]], dtype=object)})
        pending = {int(i): {k: v[j] for k, v in out.items() if k != "idx"} for j, i in enumerate(out["idx"])}
        first, second = _rows(files, 0, 6, pending, model.labels, lambda rel: "", 4)
        assert first + second == to_predictions(files, run_batch(model, [f.path for f in files]), model.labels, lambda rel: "")
        assert (first[0].ood_score is not None) == domain and second[1].status == "error" and not pending
