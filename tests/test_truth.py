"""wbc_batch.inference.truth: true labels from class-named folders or a path,label CSV."""

from __future__ import annotations

import pytest
from conftest import LABELS

from wbc_batch.inference.truth import LabelsError, folder_truth, read_labels_csv, truth_function


@pytest.mark.parametrize(
    "rel, want",
    [
        ("EOSINOPHIL/x.jpg", "EOSINOPHIL"),
        ("eosinophil/x.jpg", "EOSINOPHIL"),
        ("slide7/Monocyte/x.jpg", "MONOCYTE"),
        ("NEUTROPHIL/slide7/x.jpg", ""),  # only the direct parent counts
        ("slide7/x.jpg", ""),
        ("x.jpg", ""),
        ("LYMPHOCYTES/x.jpg", ""),
    ],
)
def test_folder_truth(rel, want):
    assert folder_truth(rel, LABELS) == want


def _write(tmp_path, text: str, name: str = "labels.csv", encoding: str = "utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_labels_csv_relative_absolute_and_case(tmp_path):
    root = tmp_path / "run"
    p = _write(
        tmp_path,
        "\ufeff Path , LABEL ,comment\n"  # BOM, spaces and case in the header, an extra column
        "a/x.jpg,monocyte,first\n"
        f"{root}/b/y.jpg,Eosinophil,\n"
        "./c.jpg, NEUTROPHIL ,\n"
        '"d,e.jpg",LYMPHOCYTE,\n'
        "a/x.jpg,MONOCYTE,repeated but consistent\n",
    )
    assert read_labels_csv(p, root, LABELS) == {
        "a/x.jpg": "MONOCYTE",
        "b/y.jpg": "EOSINOPHIL",
        "c.jpg": "NEUTROPHIL",
        "d,e.jpg": "LYMPHOCYTE",
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,class\na.jpg,MONOCYTE\n", r"needs a header with 'path' and 'label' columns, found \['file', 'class'\]"),
        ("path\na.jpg\n", "needs a header with 'path' and 'label'"),
        ("", r"needs a header with 'path' and 'label' columns, found \[\]"),
        ("path,label\na.jpg,MONOCYTE\nb.jpg,BASOPHIL\n", r"labels\.csv: line 3: label 'BASOPHIL' is neither one of the model's labels \['EOSINOPHIL', 'LYMPHOCYTE', 'MONOCYTE', 'NEUTROPHIL'\] nor EXCLUDE$"),
        ("path,label\na.jpg,MONOCYTE\na.jpg,EOSINOPHIL\n", r"labels\.csv: line 3: 'a\.jpg' is given twice, as 'MONOCYTE' \(line 2\) and 'EOSINOPHIL'$"),
        ("path,label\na.jpg,\n", r"labels\.csv: line 2: empty path or label$"),
        ("path,label\n,MONOCYTE\nb.jpg,\n", r"labels\.csv: line 2: empty path or label; line 3: empty path or label$"),
    ],
)
def test_bad_labels_csv(tmp_path, text, message):
    with pytest.raises(LabelsError, match=message):
        read_labels_csv(_write(tmp_path, text), tmp_path, LABELS)


def test_labels_csv_not_utf8(tmp_path):
    p = _write(tmp_path, "path,label\nä.jpg,MONOCYTE\n", encoding="latin-1")
    with pytest.raises(LabelsError, match="not UTF-8 text"):
        read_labels_csv(p, tmp_path, LABELS)


def test_labels_csv_missing(tmp_path):
    with pytest.raises(LabelsError, match=r"nope\.csv: cannot read \(No such file or directory\)"):
        read_labels_csv(tmp_path / "nope.csv", tmp_path, LABELS)


def test_labels_csv_paths_in_predictions_csv_form_name_the_same_files(tmp_path):
    """predictions.csv writes a path that would start a spreadsheet formula from ./; as --labels it names the same file."""
    f = tmp_path / "labels.csv"
    f.write_text('path,label\n./=a.jpeg,eosinophil\n"./\tslide/b.jpeg",MONOCYTE\n./-c.jpeg,NEUTROPHIL\n', encoding="utf-8")
    assert read_labels_csv(f, tmp_path, LABELS) == {"=a.jpeg": "EOSINOPHIL", "\tslide/b.jpeg": "MONOCYTE", "-c.jpeg": "NEUTROPHIL"}


def test_a_reviewers_corrections_csv_is_a_labels_csv_and_its_excluded_cells_have_no_truth(tmp_path):
    """The report page saves corrections.csv in --labels' format; a cell set aside (EXCLUDE) gives no true label."""
    f = _write(tmp_path, "path,label\nMONOCYTE/a.jpg,EXCLUDE\nb.jpg,monocyte\nc.jpg,exclude\n")
    table = read_labels_csv(f, tmp_path, LABELS)
    assert table == {"MONOCYTE/a.jpg": "", "b.jpg": "MONOCYTE", "c.jpg": ""}
    truth = truth_function(LABELS, table)
    assert [truth(p) for p in ("MONOCYTE/a.jpg", "b.jpg", "NEUTROPHIL/d.jpg")] == ["", "MONOCYTE", "NEUTROPHIL"]
