"""What a new user reads: install hints, warnings, the model card, model names and report folders."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, ROOT, SAMPLE
from test_cli import keep_signal_handlers  # noqa: F401  (a fixture)
from test_orchestrator import _non_cells

from wbc_batch.cli import main
from wbc_batch.inference.rows import domain_warning

CPU_TORCH = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(("command", "absent", "hint"), [
    (["adapt", "M", SAMPLE, "-o", "x.onnx"], "onnx", "adapt needs onnx (not torch): pip install onnx"),
    (["calibrate", "M", "--reference-dir", SAMPLE, "-o", "x.onnx"], "onnx", "calibrate needs onnx (not torch): pip install onnx"),
    (["train", SAMPLE], "torch", "train and export need torch (the train extra): pip install '.[train]' in the wbc-batch checkout "
                                 f"(on a machine without a GPU, first {CPU_TORCH})"),
    (["export", SAMPLE], "torch", "train and export need torch (the train extra): pip install '.[train]' in the wbc-batch checkout "
                                  f"(on a machine without a GPU, first {CPU_TORCH})"),
])
def test_a_missing_package_names_the_smallest_install_that_works(monkeypatch, color_model, command, absent, hint):
    monkeypatch.setitem(sys.modules, absent, None)  # import fails as where the package is not installed
    r = run(*[color_model if a == "M" else a for a in command])
    assert (r.exit_code, r.stderr) == (2, f"wbc-batch: error: {hint}\n")


def test_the_ray_hint_names_ray_itself(monkeypatch, color_model, tmp_path):
    from wbc_batch.inference import ray_engine

    monkeypatch.setattr(ray_engine, "ray", None)
    r = run("classify", SAMPLE, "-m", color_model, "-o", tmp_path / "p.csv", "--engine", "ray")
    assert (r.exit_code, r.stderr) == (2, "wbc-batch: error: --engine ray needs Ray: pip install 'ray[data]'\n")


@pytest.mark.parametrize("extra", [[], ["-q"], ["--report", "rep"], ["--report", "rep", "-q"]])
def test_the_out_of_domain_warning_is_printed_once_quiet_or_not(tmp_path, trust_model, sample_copy, extra):
    _non_cells(sample_copy / "zz_flat")  # 5 flat fields: with the 4 sample images above the threshold, 9 of 45
    warning = f"wbc-batch: warning: {domain_warning(9, 45)}\n"
    r = run("classify", sample_copy, "-m", trust_model, "-o", tmp_path / "p.csv", "--workers", "1", *[tmp_path / a if a == "rep" else a for a in extra])
    assert r.exit_code == 0, r.output
    assert r.stderr.count(warning) == 1
    if "-q" in extra:  # quiet silences progress and the summary, not a warning that the results are not to be trusted
        assert r.stderr == warning


def test_an_interrupted_run_says_its_scores_are_partial(monkeypatch, tmp_path, color_model, sample_copy, keep_signal_handlers):  # noqa: F811
    import wbc_batch.cli as cli

    real, batches = cli.run_classify, []

    def stop_after_three_batches(preds):
        batches.append(preds)
        if len(batches) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_classify", lambda cfg, engine=None: real(cfg, on_batch=stop_after_three_batches, engine=engine))
    r = run("classify", sample_copy, "-m", color_model, "-o", tmp_path / "p.csv", "--workers", "1", "--batch-size", "4")
    assert r.exit_code == 130
    summary = r.stderr.splitlines()[0]
    assert summary.startswith("wbc-batch: files 12  ok 12  errors 0  accuracy ") and "(partial: 12 of 40 files)" in summary


# -- the model card (info) ------------------------------------------------------------------------------------------------

SHIPPED_DIR = ROOT / "export"


def _section(card: str, key: str) -> list[str]:
    """The card's lines for one key: its own and the indented ones after it."""
    lines = card.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith(f"{key}:"))
    return [lines[i], *itertools.takewhile(lambda x: x.startswith(" "), lines[i + 1:])]


@pytest.mark.parametrize("name", ["wbc-default.onnx", "wbc-v3.onnx", "wbc-v1.onnx"])
def test_info_tells_training_and_domain_in_words_on_lines_of_sane_length(name):
    path = SHIPPED_DIR / name
    if not path.is_file():
        pytest.skip(f"export/{name} missing")
    r = run("info", path)
    assert r.exit_code == 0, r.output
    assert max(len(x) for x in r.stdout.splitlines()) <= 120
    for key in ("training", "domain"):
        assert not any(c in x for x in _section(r.stdout, key) for c in '{["'), key  # no raw JSON


def test_info_counts_the_images_the_shipped_model_was_trained_on():
    path = SHIPPED_DIR / "wbc-default.onnx"
    if not path.is_file():
        pytest.skip("export/wbc-default.onnx missing")
    card = run("info", path).stdout
    training = _section(card, "training")
    assert training[0] == "training:   5400 images in 2 folders (4612 train, 788 validation); weights of epoch 9 of 10"
    assert "            started from imagenet weights," in training
    assert any(x.startswith("            ../shared/data/pbc/train: 3000 images (BASOPHIL 150, EOSINOPHIL 600, ERYTHROBLAST 150, IG 150,")
               for x in training)
    assert "4160" not in card  # the whole folder, of which the run drew 3000
    assert _section(card, "domain")[0] == "domain:     in domain when ood_score <= 1.24808 (the 0.995 quantile of 1871 held-out images)"


def test_info_of_the_first_shipped_model_says_its_domain_check_came_from_training_images():
    path = SHIPPED_DIR / "wbc-v1.onnx"
    if not path.is_file():
        pytest.skip("export/wbc-v1.onnx missing")
    domain = _section(run("info", path).stdout, "domain")
    assert domain[0] == "domain:     in domain when ood_score <= 1.95318 (the 0.995 quantile of 9957 training images)"


def test_the_data_fingerprint_covers_only_the_classes_trained_on(tmp_path):
    from wbc_batch.training.export import data_fingerprint

    four, five = tmp_path / "four", tmp_path / "five"
    shutil.copytree(SAMPLE, four, ignore=shutil.ignore_patterns("README*"))
    shutil.copytree(four, five)
    shutil.copytree(five / "MONOCYTE", five / "BASOPHIL")
    got = data_fingerprint(five, classes=LABELS)
    assert got["files"] == 40 and got["sha256_names_sizes"] == data_fingerprint(four)["sha256_names_sizes"]
    assert data_fingerprint(five)["files"] == 50


# -- model names ------------------------------------------------------------------------------------------------------------


def test_adapt_names_its_model_after_the_source_and_the_images_or_as_told(tmp_path):
    pytest.importorskip("onnx")
    from wbc_batch.inference.model import default_model_path, load_model

    if not default_model_path().is_file():
        pytest.skip("shipped model export/wbc-default.onnx missing")
    lab = tmp_path / "lab3"
    shutil.copytree(SAMPLE / "NEUTROPHIL", lab)
    r = run("adapt", default_model_path(), lab, "-o", tmp_path / "a.onnx", "--max-images", "8")
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "a.onnx").metadata.name == "wbc-default-adapted-lab3"
    assert "wrote {} (model name wbc-default-adapted-lab3)".format(tmp_path / "a.onnx") in r.stdout
    r = run("adapt", default_model_path(), lab, "-o", tmp_path / "b.onnx", "--max-images", "8", "--name", "lab-3-v2")
    assert r.exit_code == 0 and load_model(tmp_path / "b.onnx").metadata.name == "lab-3-v2"


def test_each_shipped_model_is_named_after_its_file():
    from wbc_batch.inference.model import load_model

    shipped = sorted(SHIPPED_DIR.glob("*.onnx"))
    if not shipped:
        pytest.skip("no shipped model under export/")
    assert {p.stem: load_model(p, threads=1).metadata.name for p in shipped} == {p.stem: p.stem for p in shipped}


# -- report folders -----------------------------------------------------------------------------------------------------------


def _not_empty(folder) -> str:
    return f"wbc-batch: error: report folder {folder} is not empty: give --overwrite to replace the report in it, or another folder\n"


def test_report_refuses_a_folder_that_holds_files_unless_overwrite(tmp_path, color_model):
    predictions, rep = tmp_path / "p.csv", tmp_path / "rep"
    assert run("classify", SAMPLE, "-m", color_model, "-o", predictions, "--workers", "1", "-q").exit_code == 0
    rep.mkdir()
    (rep / "notes.txt").write_text("mine")
    r = run("report", predictions, "-o", rep)
    assert (r.exit_code, r.stderr) == (5, _not_empty(rep))
    assert sorted(os.listdir(rep)) == ["notes.txt"]
    (rep / "differential.csv").write_text("an earlier report's, which this one does not write")
    r = run("report", predictions, "-o", rep, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (rep / "notes.txt").read_text() == "mine" and not (rep / "differential.csv").exists() and (rep / "report.html").is_file()
    assert run("report", predictions, "-o", tmp_path / "empty").exit_code == 0  # a new folder needs no flag


def test_classify_replaces_a_report_folder_only_with_overwrite_or_resume(tmp_path, color_model):
    out, rep = tmp_path / "p.csv", tmp_path / "rep"
    rep.mkdir()
    (rep / "report.html").write_text("old")
    args = ["classify", SAMPLE, "-m", color_model, "-o", out, "--workers", "1", "-q", "--report", rep]
    r = run(*args)
    assert (r.exit_code, r.stderr) == (5, _not_empty(rep))
    assert not out.exists() and (rep / "report.html").read_text() == "old"  # refused before the run
    r = run(*args, "--overwrite")
    assert r.exit_code == 0 and (rep / "report.html").read_text() != "old"
    (rep / "report.html").write_text("old")
    r = run(*args, "--resume")  # the same run's report, brought up to date
    assert r.exit_code == 0 and (rep / "report.html").read_text() != "old"


def test_report_files_names_every_file_a_report_writes(tmp_path, color_model):
    from wbc_batch.evaluation.report import REPORT_FILES, write_report

    for i, src in enumerate(sorted(SAMPLE.rglob("*.jpeg"))):  # slide folders of class folders: truth and a differential
        dst = tmp_path / "in" / f"slide_{i % 2}" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "history.csv").write_text("epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_macro_f1,lr,seconds\n"
                                         "1,1.0,0.5,1.1,0.45,0.4,0.001,60\n2,0.5,0.6,0.6,0.55,0.5,0.001,60\n")
    assert run("classify", tmp_path / "in", "-m", color_model, "-o", tmp_path / "p.csv", "--workers", "1", "-q").exit_code == 0
    write_report(tmp_path / "p.csv", tmp_path / "rep", run_dir=run_dir, on_warning=None)
    assert sorted(os.listdir(tmp_path / "rep")) == sorted(REPORT_FILES)


def test_the_quick_start_outputs_are_ignored_by_git():
    """README's quick start writes predictions.csv (with its sidecar and lock) and report/ in the checkout."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (an sdist): nothing to ignore")
    from wbc_batch.inference.output_guard import lock_path
    from wbc_batch.inference.predictions import sidecar_path

    csv_ = ROOT / "predictions.csv"
    names = [csv_, sidecar_path(csv_), lock_path(csv_), ROOT / "report" / "report.html", ROOT / "predictions-report" / "report.html"]
    names = [str(p.relative_to(ROOT)) for p in names]
    r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.split() == names


# -- the README and the test suite's own skips ----------------------------------------------------------------------------


def _readme_section(title: str, end: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    return text[start:text.index(end, start)]


def test_the_readme_table_lists_every_classify_option():
    import click

    from wbc_batch.cli import classify

    rows = [line.split("|")[1].strip().strip("`") for line in _readme_section("Classify", "What it does:").splitlines()
            if line.startswith("| `")]
    documented = {flag.split()[0] for row in rows for flag in row.split(", ") if flag.startswith("-")}
    assert documented == {o for p in classify.params if isinstance(p, click.Option) for o in p.opts}


def test_skips_for_missing_data_or_browser_say_how_to_enable_them():
    from conftest import needs_chromium, needs_shared_data

    assert "put Paul Mooney's Kaggle set 'blood-cells' (dataset2-master: TRAIN/ and TEST/ of class folders) at" \
        in needs_shared_data().kwargs["reason"]
    assert "put the PBC set's class folders (Acevedo et al. 2020, doi:10.17632/snkd93bnjr.1) as train/ and test/ at" \
        in needs_shared_data("pbc").kwargs["reason"]
    assert "apt-get install chromium" in needs_chromium().kwargs["reason"]
    for path in sorted(set((ROOT / "tests").glob("test_*.py")) - {Path(__file__)}):  # every such skip goes through those markers
        text = path.read_text(encoding="utf-8")
        assert "CHROMIUM.exists()" not in text and ".is_dir(), reason=" not in text, path.name
