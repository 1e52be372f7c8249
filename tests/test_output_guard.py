"""wbc_batch.inference.output_guard: no file the run reads becomes its output, and one run per output under every name."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from conftest import sample_images
from test_orchestrator import _cfg, read_rows

from wbc_batch.inference import output_guard
from wbc_batch.inference.orchestrator import run_classify
from wbc_batch.inference.output_guard import lock_path, output_lock
from wbc_batch.inference.predictions import OutputError, sidecar_path


def _snapshot(*folders: Path) -> dict[Path, bytes]:
    """Every file under ``folders`` (through symlinked folders too) with its bytes."""
    return {p: p.read_bytes() for d in folders for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def linked(tmp_path, sample_copy) -> Path:
    """An image outside the input folder that the walk reaches through the symlinked folder ``in/linked``."""
    ext = tmp_path / "ext"
    ext.mkdir()
    shutil.copy(sample_images()[1], ext / "b.jpeg")
    (sample_copy / "linked").symlink_to("../ext")
    return ext / "b.jpeg"


def test_overwrite_refuses_an_image_the_walk_reaches_through_a_symlinked_folder(tmp_path, color_model, sample_copy, linked):
    before = _snapshot(sample_copy, linked.parent)
    out = sample_copy / "linked" / "b.jpeg"
    with pytest.raises(OutputError, match=r"output .*linked/b\.jpeg is one of the input files \(linked/b\.jpeg\)") as e:
        run_classify(_cfg([sample_copy], out, color_model, overwrite=True))
    assert e.value.exit_code == 5
    assert _snapshot(sample_copy, linked.parent) == before and not sidecar_path(out).exists()


@pytest.mark.parametrize("name", ["out.jpeg", "out.csv"])
def test_overwrite_refuses_a_hard_link_to_an_input_image(tmp_path, color_model, sample_copy, name):
    image = sample_copy / "EOSINOPHIL" / sorted(os.listdir(sample_copy / "EOSINOPHIL"))[0]
    out = tmp_path / name
    os.link(image, out)
    before = _snapshot(sample_copy)
    with pytest.raises(OutputError, match=rf"output .*{name} is one of the input files \(EOSINOPHIL/{image.name}\)") as e:
        run_classify(_cfg([sample_copy], out, color_model, overwrite=True))
    assert e.value.exit_code == 5 and _snapshot(sample_copy) == before and out.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("alias", ["same", "symlink", "hard link"])
@pytest.mark.parametrize("what", ["model", "labels", "input"])
def test_overwrite_refuses_the_model_the_labels_and_any_input_named_on_the_command_line(tmp_path, color_model, sample_copy, what, alias):
    model = shutil.copy(color_model, tmp_path / "m.onnx")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n")
    notes = tmp_path / "notes.txt"  # named on the command line: an input (an error row), although no image
    notes.write_text("not an image\n")
    target = {"model": model, "labels": labels, "input": notes}[what]
    out = {"same": target, "symlink": tmp_path / "link", "hard link": tmp_path / "hard"}[alias]
    if alias == "symlink":
        out.symlink_to(target)
    elif alias == "hard link":
        os.link(target, out)
    before = _snapshot(tmp_path)
    cfg = _cfg([sample_copy, notes], out, model, overwrite=True, labels_csv=str(labels))
    message = {"model": "the model file", "labels": "the --labels file", "input": r"one of the input files \(notes\.txt\)"}[what]
    with pytest.raises(OutputError, match=rf"output .* is {message}") as e:
        run_classify(cfg)
    assert e.value.exit_code == 5 and _snapshot(tmp_path) == before


def test_overwriting_a_previous_csv_does_not_walk_the_inputs_again(tmp_path, color_model, sample_copy, monkeypatch):
    """Only an output that could be an image (by name or content, or with a second name) is looked for among the inputs."""
    out = tmp_path / "p.csv"
    out.write_text("an old run\n")

    def no_walk(*a, **k):
        raise AssertionError("the inputs were walked to check the output")

    monkeypatch.setattr(output_guard, "iter_images", no_walk)
    run_classify(_cfg([sample_copy], out, color_model, overwrite=True))
    assert len(read_rows(out)) == 40


def _alias(kind: str, out: Path, tmp_path: Path) -> Path:
    """Another name of ``out``."""
    if kind == "symlink":
        (tmp_path / "link.csv").symlink_to(out.name)
        return tmp_path / "link.csv"
    if kind == "hard link":
        os.link(out, tmp_path / "hard.csv")
        return tmp_path / "hard.csv"
    if kind == "symlinked folder":
        (tmp_path / "dir").symlink_to(".")
        return tmp_path / "dir" / out.name
    return Path(os.path.relpath(tmp_path), "sub", "..", out.name)  # another spelling, relative to the working folder


@pytest.mark.parametrize("kind", ["symlink", "hard link", "symlinked folder", "relative spelling"])
def test_every_name_of_an_output_in_use_is_refused(tmp_path, color_model, sample_copy, kind):
    out = tmp_path / "p.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    (tmp_path / "sub").mkdir()
    alias = _alias(kind, out, tmp_path)
    before = out.read_bytes()
    with output_lock(out):
        with pytest.raises(OutputError, match=r"is in use by another wbc-batch run") as e:
            run_classify(_cfg([sample_copy], alias, color_model, overwrite=True))
    assert e.value.exit_code == 5 and out.read_bytes() == before
    assert not lock_path(out).exists() and not lock_path(alias).exists()


def test_a_csv_the_run_creates_is_its_own_under_a_name_given_while_it_runs(tmp_path, color_model, sample_copy):
    out, hard = tmp_path / "p.csv", tmp_path / "hard.csv"
    refused: list[OutputError] = []

    def second_run(preds):
        if not hard.exists():
            os.link(out, hard)
            with pytest.raises(OutputError, match=r"hard\.csv is in use by another wbc-batch run") as e:
                run_classify(_cfg([sample_copy], hard, color_model, overwrite=True))
            refused.append(e.value)

    run_classify(_cfg([sample_copy], out, color_model), on_batch=second_run)
    assert len(refused) == 1 and len(read_rows(out)) == 40


@pytest.mark.parametrize("call", ["pwrite", "ftruncate"])
def test_a_lock_file_that_cannot_be_written_is_an_output_error(tmp_path, color_model, sample_copy, monkeypatch, call):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_guard.os, call, full)
    out = tmp_path / "p.csv"
    with pytest.raises(OutputError, match=r"cannot write the lock file .*p\.csv\.lock: No space left on device") as e:
        run_classify(_cfg([sample_copy], out, color_model))
    assert e.value.exit_code == 5 and sorted(os.listdir(tmp_path)) == ["in"]


def test_a_run_resumed_through_a_symlink_to_its_csv_finds_its_sidecar(tmp_path, color_model, sample_copy):
    out = tmp_path / "out.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    before = out.read_bytes()
    alias = tmp_path / "link.csv"
    alias.symlink_to("out.csv")
    assert sidecar_path(alias) == sidecar_path(out) and lock_path(alias) == lock_path(out)
    summary = run_classify(_cfg([sample_copy], alias, color_model, resume=True))
    assert (summary.resumed, summary.processed) == (len(read_rows(out)), 0) and out.read_bytes() == before
    assert not (tmp_path / "link.csv.run.json").exists()
