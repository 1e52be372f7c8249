"""What a new user reads: install hints, warnings, the model card, model names and report folders."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner
from conftest import SAMPLE
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
