"""train --labels: the files a path,label CSV names (a review's corrections.csv) become a class-folder tree of links that
training, export and --init read as any data folder."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, SAMPLE

from wbc_batch.evaluation.corrections import CorrectionsError
from wbc_batch.training.data import VIEW_RECORD, labelled_view, scan_class_folders

IMAGES = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*.jpeg"))


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def _corrections(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """24 cells of three classes as a reviewer labelled them (one in lower case), and 4 excluded."""
    chosen = {rel: rel.split("/")[0] for rel in IMAGES if not rel.startswith("MONOCYTE")}
    rows = [(rel, lb.lower() if i == 0 else lb) for i, (rel, lb) in enumerate(list(chosen.items())[:24])]
    rows += [(rel, "EXCLUDE") for rel in list(chosen)[24:28]]
    return _csv(tmp_path / "corrections.csv", rows), dict(list(chosen.items())[:24])


def test_the_view_links_each_file_under_its_label(tmp_path):
    labels, chosen = _corrections(tmp_path)
    view = labelled_view(SAMPLE, labels, tmp_path / "run" / "labelled", classes=LABELS)
    assert view.per_class == {"EOSINOPHIL": 10, "LYMPHOCYTE": 10, "MONOCYTE": 0, "NEUTROPHIL": 4} and view.excluded == 4
    for rel, label in chosen.items():
        link = view.path / label / rel
        assert link.is_symlink() and os.readlink(link) == str((SAMPLE / rel).resolve())
    files = scan_class_folders(view.path)
    assert files.classes == LABELS  # the model's four classes, MONOCYTE empty: fine-tuning keeps every class
    assert sorted(Path(p).relative_to(view.path).as_posix() for p in files.paths) == sorted(f"{lb}/{rel}" for rel, lb in chosen.items())
    record = json.loads((view.path / VIEW_RECORD).read_text())
    assert (record["root"], record["files"], record["excluded"]) == (str(SAMPLE.resolve()), 24, 4)


def test_the_view_is_replaced_and_a_foreign_folder_is_not(tmp_path):
    labels, _ = _corrections(tmp_path)
    dest = tmp_path / "labelled"
    labelled_view(SAMPLE, labels, dest)
    fewer = _csv(tmp_path / "fewer.csv", [(IMAGES[0], "EOSINOPHIL"), (IMAGES[-1], "NEUTROPHIL")])
    view = labelled_view(SAMPLE, fewer, dest)
    assert view.per_class == {"EOSINOPHIL": 1, "NEUTROPHIL": 1}  # without classes: the CSV's own
    assert sorted(p.name for p in dest.iterdir()) == [VIEW_RECORD, "EOSINOPHIL", "NEUTROPHIL"]
    (tmp_path / "mine").mkdir()
    with pytest.raises(CorrectionsError, match="is not a folder train --labels made"):
        labelled_view(SAMPLE, fewer, tmp_path / "mine")


def test_groups_follow_the_files_into_the_view(tmp_path):
    rows = [(IMAGES[0], "EOSINOPHIL"), (IMAGES[1], "EOSINOPHIL"), (IMAGES[-1], "NEUTROPHIL")]
    groups = {IMAGES[0]: "slide1", IMAGES[1]: "slide2", IMAGES[-1]: "slide1"}
    view = labelled_view(SAMPLE, _csv(tmp_path / "l.csv", rows), tmp_path / "v", group_map=groups)
    with open(view.groups_file, encoding="utf-8", newline="") as f:
        assert {r["path"]: r["group"] for r in csv.DictReader(f)} == {f"{lb}/{rel}": groups[rel] for rel, lb in rows}


def test_every_row_that_names_no_image_is_named(tmp_path):
    (tmp_path / "root" / ".hidden").mkdir(parents=True)
    for name in ("a.jpeg", "notes.txt", ".hidden/b.jpeg"):
        (tmp_path / "root" / name).write_bytes((SAMPLE / IMAGES[0]).read_bytes())
    rows = [("a.jpeg", "EOSINOPHIL"), ("missing.jpeg", "EOSINOPHIL"), ("notes.txt", "EOSINOPHIL"), (".hidden/b.jpeg", "EOSINOPHIL"),
            ("../x.jpeg", "EOSINOPHIL"), ("a.jpeg", "MONOCYTE")]
    with pytest.raises(CorrectionsError) as e:
        labelled_view(tmp_path / "root", _csv(tmp_path / "l.csv", rows), tmp_path / "v")
    assert e.value.exit_code == 2
    assert str(e.value) == (
        f"{tmp_path / 'l.csv'}: line 3: 'missing.jpeg' is not a file under the data folder; line 4: 'notes.txt' has no image file "
        "extension; line 5: '.hidden/b.jpeg' is hidden (a file or folder whose name starts with '.'), which training skips; "
        "line 6: '../x.jpeg' lies outside the data folder; line 7: 'a.jpeg' is labelled twice ('EOSINOPHIL' on line 2)"
    )
    assert not (tmp_path / "v").exists()


def _train(labels: Path, run: Path, data: Path = SAMPLE):
    from wbc_batch.cli import main

    v3 = Path(__file__).resolve().parents[1] / "export" / "wbc-v3.onnx"  # the shipped 4-class model: the class set of LABELS
    args = ["train", str(data), "--labels", str(labels), "-o", str(run), "--init", str(v3), "--epochs", "1",
            "--size", "96x128", "--crop-window", "64", "--crop-size", "48", "--batch-size", "8", "--workers", "1", "--precise-bn", "0", "-q"]
    return CliRunner().invoke(main, args)


@pytest.mark.torch
def test_train_labels_init_and_export(tmp_path):
    """Fine-tune the shipped 4-class model on a reviewer's cells only (6 of each class, 4 excluded) and export the run."""
    pytest.importorskip("torch")
    from wbc_batch.cli import main
    from wbc_batch.inference.model import load_model

    rows = [(rel, rel.split("/")[0]) for lb in LABELS for rel in [r for r in IMAGES if r.startswith(lb)][:6]]
    labels = _csv(tmp_path / "corrections.csv", rows + [(r, "EXCLUDE") for r in IMAGES if r.startswith("MONOCYTE")][6:10])
    run = tmp_path / "run"
    res = _train(labels, run)
    assert res.exit_code == 0, res.output
    assert f"training on 24 files of {labels} (EOSINOPHIL 6, LYMPHOCYTE 6, MONOCYTE 6, NEUTROPHIL 6; 4 excluded)" in res.output
    rec = json.loads((run / "config.json").read_text())
    assert rec["classes"] == list(LABELS) and rec["n_train"] + rec["n_val"] == 24
    assert rec["data_dir"] == str(run / "labelled") and rec["init"]["kept"] == list(LABELS)
    assert rec["extra"]["labels"] == {"csv": str(labels.resolve()), "root": str(SAMPLE.resolve())}
    res = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "m.onnx", threads=1).metadata.labels == LABELS


@pytest.mark.torch
def test_train_labels_keeps_a_class_it_has_no_file_of_and_says_so(tmp_path):
    pytest.importorskip("torch")
    labels, _ = _corrections(tmp_path)
    res = _train(labels, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "(EOSINOPHIL 10, LYMPHOCYTE 10, MONOCYTE 0, NEUTROPHIL 4; 4 excluded)" in res.output
    assert f"warning: no file of MONOCYTE in {labels}: the model keeps the class as --init had it" in res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == list(LABELS)


@pytest.mark.torch
def test_train_labels_needs_one_data_folder(tmp_path):
    pytest.importorskip("torch")
    from wbc_batch.cli import main

    labels, _ = _corrections(tmp_path)
    res = CliRunner().invoke(main, ["train", str(SAMPLE), str(SAMPLE), "--labels", str(labels), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--labels names files under one DATA_DIR" in res.output
