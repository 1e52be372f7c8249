"""wbc-batch classify / info: exit codes, messages, and a real SIGKILL + --resume in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, ROOT, SAMPLE, build_color_model
from test_orchestrator import make_bad_inputs, read_rows

from wbc_batch import __version__
from wbc_batch.cli import main
from wbc_batch.inference.metadata import ModelMetadata
from wbc_batch.inference.model import load_model
from wbc_batch.inference.predictions import sidecar_path

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def wbc(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def classify(inputs, out, model, *extra):
    return wbc("classify", *([inputs] if isinstance(inputs, (str, Path)) else inputs), "-o", out, "-m", model, "--workers", "1", *extra)


def test_version():
    r = wbc("--version")
    assert r.exit_code == 0 and r.output.strip() == f"wbc-batch, version {__version__}"


def test_classify_ok_prints_a_summary(tmp_path, color_model, sample_copy):
    r = classify(sample_copy, tmp_path / "p.csv", color_model, "--batch-size", "8")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    assert "wbc-batch: files 40  ok 40  errors 0  " in r.stderr and f"-> {tmp_path / 'p.csv'}" in r.stderr
    assert len(read_rows(tmp_path / "p.csv")) == 40
    r = classify(sample_copy, tmp_path / "q.csv", color_model, "-q")
    assert (r.exit_code, r.output) == (0, "")


def test_bad_files_are_rows_not_failures(tmp_path, color_model):
    expected = make_bad_inputs(tmp_path / "in")
    r = classify(tmp_path / "in", tmp_path / "p.csv", color_model, "-q")
    assert r.exit_code == 0
    rows = read_rows(tmp_path / "p.csv")
    assert {x["path"]: x["status"] for x in rows} == {k: v.split(":")[0] for k, v in expected.items()}


def test_empty_folder_exit_3(tmp_path, color_model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no images here")
    r = classify(tmp_path / "empty", tmp_path / "p.csv", color_model, "-q")
    assert r.exit_code == 3
    assert r.stderr == "wbc-batch: error: no image files found under the inputs\n"


def test_all_corrupt_exit_3(tmp_path, color_model):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"")
    (d / "b.jpg").write_text("text")
    r = classify(d, tmp_path / "p.csv", color_model, "-q")
    assert r.exit_code == 3
    assert r.stderr == f"wbc-batch: error: none of the 2 files could be read (see the error column of {tmp_path / 'p.csv'})\n"
    assert [x["error"] for x in read_rows(tmp_path / "p.csv")] == ["empty file", "not an image (format not recognised)"]


def _bad_models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    not_onnx = tmp_path / "text.onnx"
    not_onnx.write_text("hello")
    mismatch = ModelMetadata(labels=LABELS, height=224, width=224).to_json_dict()
    return {
        "no-metadata": (build_color_model(tmp_path / "bare.onnx", metadata=None), "carries no 'wbc_batch' metadata"),
        "not-onnx": (not_onnx, "is not a loadable ONNX model"),
        "size-mismatch": (build_color_model(tmp_path / "mm.onnx", metadata=mismatch), "does not match the metadata (NHWC 224x224x3"),
    }


@pytest.mark.parametrize("kind", ["no-metadata", "not-onnx", "size-mismatch"])
def test_unusable_model_exit_4(tmp_path, sample_copy, kind):
    path, message = _bad_models(tmp_path)[kind]
    r = classify(sample_copy, tmp_path / "p.csv", path, "-q")
    assert r.exit_code == 4
    assert r.stderr.startswith("wbc-batch: error: ") and message in r.stderr
    assert not (tmp_path / "p.csv").exists()
    r = wbc("info", path)
    assert r.exit_code == 4 and message in r.stderr


def test_info(color_model):
    r = wbc("info", color_model)
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0] == f"model:      {color_model}"
    assert "labels:     EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL" in lines
    assert "input:      image  NHWC uint8 24x32x3 RGB" in lines
    assert "preprocess: decode, convert to RGB, resize to 32x24 (bilinear, JPEG draft)" in lines
    r = wbc("info", "--json", color_model)
    assert json.loads(r.stdout) == ModelMetadata(labels=LABELS, height=24, width=32, name="color-test", arch="mean-colour").to_json_dict()


def test_info_says_a_keep_aspect_model_pads(tmp_path):
    md = ModelMetadata(labels=LABELS, height=24, width=32, keep_aspect=True)
    path = build_color_model(tmp_path / "aspect.onnx", metadata=md.to_json_dict())
    r = wbc("info", path)
    assert "preprocess: decode, convert to RGB, fit inside 32x24 keeping the aspect ratio, centred on black (bilinear, JPEG draft)" in r.stdout.splitlines()


def test_output_exists_exit_5_and_overwrite(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    out.write_text("keep me\n")
    r = classify(sample_copy, out, color_model, "-q")
    assert r.exit_code == 5 and "exists: use --resume to continue that run, or --overwrite to replace it" in r.stderr
    assert out.read_text() == "keep me\n"
    r = classify(sample_copy, out, color_model, "-q", "--overwrite")
    assert r.exit_code == 0 and len(read_rows(out)) == 40


def test_resume_with_another_model_exit_5(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    assert classify(sample_copy, out, color_model, "-q").exit_code == 0
    other = build_color_model(tmp_path / "other.onnx", height=16, width=16)
    r = classify(sample_copy, out, other, "-q", "--resume")
    assert r.exit_code == 5 and "cannot resume:" in r.stderr and "not by other.onnx" in r.stderr
    r = classify(sample_copy, out, color_model, "--resume")  # the right model: nothing left to do
    assert r.exit_code == 0 and "(resumed: 40 already done)" in r.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,class\na.jpeg,MONOCYTE\n", "needs a header with 'path' and 'label' columns"),
        ("path,label\nEOSINOPHIL/_0_1616.jpeg,BASOPHIL\n", "line 2: label 'BASOPHIL' is neither one of the model's labels"),
        ("path,label\na.jpeg,MONOCYTE\na.jpeg,NEUTROPHIL\n", "line 3: 'a.jpeg' is given twice, as 'MONOCYTE' (line 2) and 'NEUTROPHIL'"),
    ],
)
def test_bad_labels_csv_exit_2(tmp_path, color_model, sample_copy, text, message):
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    r = classify(sample_copy, tmp_path / "p.csv", color_model, "-q", "--labels", labels)
    assert r.exit_code == 2 and message in r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_labels_csv(tmp_path, color_model, sample_copy):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nEOSINOPHIL/_0_1616.jpeg,neutrophil\n")
    assert classify(sample_copy, tmp_path / "p.csv", color_model, "-q", "--labels", labels).exit_code == 0
    truth = {r["path"]: r["true_label"] for r in read_rows(tmp_path / "p.csv")}
    assert truth["EOSINOPHIL/_0_1616.jpeg"] == "NEUTROPHIL"
    assert truth["EOSINOPHIL/_1_1414.jpeg"] == "EOSINOPHIL"  # folder name where the table is silent


def test_usage_errors_exit_2(tmp_path, color_model, sample_copy):
    assert wbc("classify", tmp_path / "missing", "-m", color_model).exit_code == 2
    assert classify(sample_copy, tmp_path / "p.csv", color_model, "--batch-size", "0").exit_code == 2


@pytest.mark.slow
def test_one_and_two_workers_write_identical_csvs(tmp_path, color_model, sample_copy):
    (sample_copy / "bad.jpg").write_bytes(b"x")
    a = wbc("classify", sample_copy, "-m", color_model, "-o", tmp_path / "a.csv", "--workers", "1", "--batch-size", "3", "-q")
    b = wbc("classify", sample_copy, "-m", color_model, "-o", tmp_path / "b.csv", "--workers", "2", "--batch-size", "3", "-q")
    assert a.exit_code == b.exit_code == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert len(read_rows(tmp_path / "a.csv")) == 41


def test_inference_modules_never_import_torch():
    code = "import wbc_batch.cli, wbc_batch.inference.local_engine, wbc_batch.inference.orchestrator; import sys; assert 'torch' not in sys.modules, 'torch imported'; assert 'torchvision' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_wbc_batch_is_light():
    code = "import wbc_batch, sys; assert wbc_batch.__version__; assert 'numpy' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# -- a real kill ---------------------------------------------------------------------------------------
def _many_inputs(root: Path, copies: int) -> int:
    """``copies`` x the 40 samples, as symlinks in class folders: a few hundred real files."""
    n = 0
    for i in range(copies):
        for src in sorted(SAMPLE.rglob("*.jpeg")):
            dst = root / f"batch{i:02d}" / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
            n += 1
    return n


def _data_lines(path: Path) -> int:
    try:
        return max(path.read_bytes().count(b"\n") - 1, 0)
    except FileNotFoundError:
        return 0


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "wbc_batch", "classify", *map(str, args)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, color_model):
    n = _many_inputs(tmp_path / "in", 10)
    assert n == 400
    out, ref = tmp_path / "p.csv", tmp_path / "ref.csv"
    args = (tmp_path / "in", "-m", color_model, "--batch-size", "2", "-q")

    proc = subprocess.Popen(_cli(*args, "-o", out, "--workers", "2"), env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and _data_lines(out) < 20 and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its worker processes, if the kill left any
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    at_kill = _data_lines(out)
    assert 20 <= at_kill < n, at_kill
    assert json.loads(sidecar_path(out).read_text())["state"] == "running"  # it never got to say otherwise

    r = subprocess.run(_cli(*args, "-o", out, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(_cli(*args, "-o", ref, "--workers", "1"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    text = out.read_bytes()
    assert text.endswith(b"\n")
    with open(out, encoding="utf-8", newline="") as f:
        records = list(csv.reader(f, strict=True))
    assert all(len(rec) == 10 for rec in records)  # no torn line anywhere
    got, want = read_rows(out), read_rows(ref)
    assert len(got) == n and len({r["path"] for r in got}) == n  # one row per file, no duplicate
    key = lambda r: (r["path"], r["label"], r["confidence"], *(r[f"prob_{lb}"] for lb in LABELS), r["true_label"], r["status"])  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, want))
    side = json.loads(sidecar_path(out).read_text())
    assert side["state"] == "finished" and side["summary"]["resumed"] == at_kill and side["summary"]["files"] == n


def test_any_library_error_is_one_message_and_its_exit_code(tmp_path, color_model, sample_copy, monkeypatch):
    import wbc_batch.cli as cli
    from wbc_batch.inference.ray_engine import RayEngineError

    def fail(cfg, engine=None):
        raise RayEngineError("the cluster went away")

    monkeypatch.setattr(cli, "run_classify", fail)
    r = classify(sample_copy, tmp_path / "p.csv", color_model)
    assert (r.exit_code, r.stdout, r.stderr) == (1, "", "wbc-batch: error: the cluster went away\n")


def test_options_not_given_take_the_config_defaults(tmp_path, sample_copy, monkeypatch):
    """Click passes None for options not given, so ClassifyConfig and RunnerOptions hold the only defaults."""
    import wbc_batch.cli as cli
    from wbc_batch.inference.engine import RunnerOptions
    from wbc_batch.inference.orchestrator import ClassifyConfig

    seen = []

    class Stop(Exception):
        pass

    def capture(cfg, engine=None):
        seen.append(cfg)
        raise Stop  # the config is what this test is about

    monkeypatch.setattr(cli, "run_classify", capture)
    with pytest.raises(Stop):
        wbc("classify", sample_copy)
    assert seen == [ClassifyConfig(inputs=[str(sample_copy)], progress="auto")]
    with pytest.raises(Stop):
        wbc("classify", sample_copy, "--workers", "3", "--threads", "2", "-o", tmp_path / "x.csv", "-q")
    assert seen[1] == ClassifyConfig(inputs=[str(sample_copy)], output=str(tmp_path / "x.csv"), runner=RunnerOptions(workers=3, threads=2), progress="none")


def test_address_without_ray_engine_exit_2(tmp_path, color_model, sample_copy):
    r = classify(sample_copy, tmp_path / "p.csv", color_model, "--address", "auto")
    assert (r.exit_code, r.stderr) == (2, "wbc-batch: error: --address is only meaningful with --engine ray\n")
    assert not (tmp_path / "p.csv").exists()


# -- what a person reads: the summary's scores, the model card, usage and no-image errors ----------------
def _sklearn_scores(csv_path: Path) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    rows = [r for r in read_rows(csv_path) if r["status"] == "ok" and r["true_label"]]
    t, p = [r["true_label"] for r in rows], [r["label"] for r in rows]
    return accuracy_score(t, p), f1_score(t, p, labels=list(LABELS), average="macro", zero_division=0)


def test_summary_prints_accuracy_and_macro_f1_when_truth_is_known(tmp_path, sample_copy):
    out = tmp_path / "p.csv"
    r = wbc("classify", sample_copy, "-o", out, "--workers", "1")  # the shipped model: real scores
    assert r.exit_code == 0, r.output
    acc, f1 = _sklearn_scores(out)
    assert (f"{acc:.3f}", f"{f1:.3f}") == ("0.825", "0.822")
    assert r.stderr.startswith("wbc-batch: files 40  ok 40  errors 0  accuracy 0.825  macro-F1 0.822  ") and r.stderr.endswith(f"  -> {out}\n")
    (sample_copy / "slide7").mkdir()
    shutil.copy(next(sample_copy.rglob("*.jpeg")), sample_copy / "slide7" / "a.jpeg")
    r = wbc("classify", sample_copy, "-o", tmp_path / "q.csv", "--workers", "1")
    assert "files 41  ok 41  errors 0  accuracy 0.825  macro-F1 0.822 (40 with a true label)  " in r.stderr


def test_summary_without_truth_prints_no_scores(tmp_path, color_model, sample_copy):
    r = classify(sample_copy / "MONOCYTE", tmp_path / "p.csv", color_model)  # files at the root: no class folder, no truth
    assert r.exit_code == 0 and r.stderr.startswith("wbc-batch: files 10  ok 10  errors 0  ") and "accuracy" not in r.stderr
    assert {row["true_label"] for row in read_rows(tmp_path / "p.csv")} == {""}


def test_resume_with_overwrite_is_a_usage_error(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    out.write_text("keep me\n")
    r = classify(sample_copy, out, color_model, "--resume", "--overwrite")
    assert r.exit_code == 2
    assert r.stderr == "wbc-batch: error: --resume and --overwrite contradict each other: --resume continues OUTPUT, --overwrite replaces it; give one\n"
    assert out.read_text() == "keep me\n" and not sidecar_path(out).exists()


def test_no_image_leaves_no_output(tmp_path, color_model):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.csv"
    r = classify(tmp_path / "empty", out, color_model)  # not quiet: no summary line for a run that wrote nothing
    assert (r.exit_code, r.stdout, r.stderr) == (3, "", "wbc-batch: error: no image files found under the inputs\n")
    assert not out.exists() and not sidecar_path(out).exists()
    r = classify(tmp_path / "empty", out, color_model, "-q")  # so the same command is not refused the next time
    assert r.exit_code == 3 and "exists" not in r.stderr


def test_info_card_of_a_bare_model(color_model):
    r = wbc("info", color_model)
    assert r.exit_code == 0
    sha = load_model(color_model, threads=1).sha256
    assert r.stdout.splitlines() == [
        f"model:      {color_model}",
        f"sha256:     {sha}",
        "name:       color-test  (arch mean-colour)",
        "labels:     EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL",
        "input:      image  NHWC uint8 24x32x3 RGB",
        "preprocess: decode, convert to RGB, resize to 32x24 (bilinear, JPEG draft)",
        "output:     probabilities  (probabilities)",
        "providers:  CPUExecutionProvider",
    ]


def test_info_card_shows_provenance_whole_and_rounded(tmp_path):
    extra = {
        "training": {
            "data": {"path": "data/TRAIN", "files": 9957, "sha256_names_sizes": "36e7bc232cad91d26d9a1ae8fa3f1870"},
            "epoch": 26,
            "config": {"size": [240, 320], "lr": 0.002, "weight_decay": 0.0005, "augment": True},
            "n_train": 8534,
        },
        "metrics": {
            "eval_dir": "data/TEST",
            "n": 2487,
            "accuracy": 0.8785685564937676,
            "macro_f1": 0.8817020178065,
            "per_class": {lb: {"precision": 1 / 3, "recall": 0.75, "f1": 0.46153846, "support": 620} for lb in LABELS},
            "confusion_matrix": [[1, 2], [3, 4]],
        },
        "export_parity": {"parity_images": 256, "max_abs_diff_all": 2.980232238769531e-07, "argmax_agreement": 1.0},
        "versions": {"torch": "2.14.1", "onnx": "1.23.2", "wbc_batch": "0.1.0"},
        "created": "2026-11-26T16:57:06+00:00",
    }
    md = ModelMetadata(labels=LABELS, height=24, width=32, name="card", arch="wbc-net", extra=extra).to_json_dict()
    path = build_color_model(tmp_path / "card.onnx", metadata=md)
    r = wbc("info", path)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[8:] == [
        "training:   8534 training images; weights of epoch 26",
        "            data/TRAIN: 9957 files, fingerprint 36e7bc232cad",
        "            recipe: size 240x320, lr 0.002, weight_decay 0.0005, augment True",
        "metrics:    on data/TEST, 2487 images: accuracy 0.879, macro_f1 0.882",
        *(f"            {lb:<10}  precision 0.333, recall 0.750, f1 0.462, support 620" for lb in LABELS),
        "            confusion (rows true, columns predicted):",
        "              EOSINOPHIL  1 2",  # one line per true class, named
        "              LYMPHOCYTE  3 4",
        "export_parity: parity_images 256, max_abs_diff_all 2.98023e-07, argmax_agreement 1",
        "versions:   torch 2.14.1, onnx 1.23.2, wbc_batch 0.1.0",
        "created:    2026-11-26T16:57:06+00:00",
    ]
    r = wbc("info", "--json", path)
    assert json.loads(r.stdout) == md  # the raw metadata, unrounded


def test_info_card_names_each_data_folder_of_a_multi_folder_model(tmp_path):
    data = [{"path": "a/TRAIN", "files": 10, "sha256_names_sizes": "0123456789abcdef"}, {"path": "pbc/train", "files": 4}]
    md = ModelMetadata(labels=LABELS, height=24, width=32, name="two", arch="wbc-net", extra={"training": {"data": data, "epoch": 2}}).to_json_dict()
    r = wbc("info", build_color_model(tmp_path / "two.onnx", metadata=md))
    assert r.exit_code == 0
    assert r.stdout.splitlines()[8:] == ["training:   weights of epoch 2", "            a/TRAIN: 10 files, fingerprint 0123456789ab", "            pbc/train: 4 files"]


def test_adapt_writes_a_new_model_and_refuses_to_overwrite_its_source(tmp_path):
    pytest.importorskip("onnx")
    from wbc_batch.inference.model import default_model_path

    shipped = default_model_path()
    if not shipped.is_file():
        pytest.skip("shipped model export/wbc-default.onnx missing")
    out = tmp_path / "lab.onnx"
    r = CliRunner().invoke(main, ["adapt", str(shipped), str(SAMPLE), "-o", str(out), "--max-images", "20"])
    assert r.exit_code == 0, r.output
    assert "adapted 49 batch norms on 20 images" in r.output and out.is_file()
    copy = tmp_path / "m.onnx"
    copy.write_bytes(shipped.read_bytes())
    r = CliRunner().invoke(main, ["adapt", str(copy), str(SAMPLE), "-o", str(copy)])
    assert r.exit_code == 5 and "is the model itself" in r.output and copy.read_bytes() == shipped.read_bytes()


def test_info_summarises_the_batch_norm_record_of_the_shipped_model():
    from wbc_batch.inference.model import default_model_path

    if not default_model_path().is_file():
        pytest.skip("shipped model export/wbc-default.onnx missing")
    r = CliRunner().invoke(main, ["info", str(default_model_path())])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("batchnorm:"))
    assert line.endswith("49 folded batch norms recorded (21008 channels): what wbc-batch adapt needs") and len(r.output) < 8000


@pytest.fixture
def keep_signal_handlers():
    """The interrupted exit ignores further signals; pytest's own handlers come back after the test."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


@pytest.mark.parametrize("where", ["model", "ray"])
def test_ctrl_c_during_start_up_exits_like_ctrl_c_during_the_run(tmp_path, color_model, sample_copy, monkeypatch, keep_signal_handlers, where):
    import wbc_batch.cli as cli
    from wbc_batch.inference import orchestrator

    if where == "model":  # a real SIGINT while the model loads
        real = orchestrator.load_model
        monkeypatch.setattr(orchestrator, "load_model", lambda *a, **k: (os.kill(os.getpid(), signal.SIGINT), real(*a, **k))[1])
    else:  # Ctrl-C while ray is imported, before the run began

        def ray_engine(address):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "_ray_engine", ray_engine)
    out = tmp_path / "p.csv"
    r = classify(sample_copy, out, color_model, "--engine", "ray" if where == "ray" else "local")
    assert (r.exit_code, r.stdout) == (130, "")
    assert r.stderr == "wbc-batch: interrupted; rerun the same command with --resume to finish\n"
    assert not out.exists() and not sidecar_path(out).exists()
