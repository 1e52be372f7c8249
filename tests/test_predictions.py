"""wbc_batch.inference.predictions: CSV columns and rows, the incremental writer, --resume scanning, the sidecar."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import LABELS

from wbc_batch.inference.predictions import (
    OutputError,
    Prediction,
    PredictionWriter,
    columns,
    format_header,
    format_rows,
    read_sidecar,
    scan_existing,
    sidecar_path,
    truncate_torn_tail,
    write_sidecar,
)

HEADER = "path,label,confidence,prob_EOSINOPHIL,prob_LYMPHOCYTE,prob_MONOCYTE,prob_NEUTROPHIL,true_label,status,error\n"
OK = Prediction("a/x.jpg", "MONOCYTE", 0.7, [0.1, 0.05, 0.7, 0.15], "MONOCYTE")
ERR = Prediction("b.jpg", status="error", error="truncated image:\n  cut\tshort")

WEIRD = [
    "comma,name.jpg",
    'quote"d.jpg',
    "sp ace/and  two.jpg",
    "ä/细胞.png",
    "new\nline.jpg",
    "carriage\rreturn.jpg",
    "'single'.jpg",
    " leading.jpg",
    "caf\udce4.jpg",  # a non-UTF-8 byte in a POSIX file name, as os.scandir returns it
]


def _read(path) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.reader(f))


def test_columns_and_header():
    assert columns(LABELS) == HEADER.strip().split(",")
    assert format_header(LABELS) == HEADER


def test_row_formatting():
    assert format_rows([OK, ERR], 4) == (
        "a/x.jpg,MONOCYTE,0.700000,0.100000,0.050000,0.700000,0.150000,MONOCYTE,ok,\nb.jpg,,,,,,,,error,truncated image: cut short\n"
    )


def test_writer_round_trips_awkward_paths(tmp_path):
    out = tmp_path / "sub" / "p.csv"  # the folder is created
    with PredictionWriter(out, LABELS) as w:
        w.write([Prediction(p, "EOSINOPHIL", 1.0, [1.0, 0.0, 0.0, 0.0]) for p in WEIRD])
        w.write([])
    rows = _read(out)
    assert rows[0] == columns(LABELS)
    assert [r[0] for r in rows[1:]] == WEIRD
    assert all(len(r) == 10 and r[-2] == "ok" for r in rows[1:])
    run = scan_existing(out, LABELS)
    assert run.done == set(WEIRD) and run.ok == len(WEIRD) and run.torn_bytes == 0


def test_writer_flushes_each_batch(tmp_path):
    out = tmp_path / "p.csv"
    w = PredictionWriter(out, LABELS)
    w.write([OK])
    assert out.read_text() == HEADER + format_rows([OK], 4)  # readable before close
    w.close()


def test_append_does_not_repeat_the_header(tmp_path):
    out = tmp_path / "p.csv"
    with PredictionWriter(out, LABELS) as w:
        w.write([OK])
    with PredictionWriter(out, LABELS, append=True) as w:
        w.write([ERR])
    assert out.read_text() == HEADER + format_rows([OK, ERR], 4)
    out.write_text("")
    with PredictionWriter(out, LABELS, append=True) as w:  # an empty file gets its header
        w.write([OK])
    assert out.read_text() == HEADER + format_rows([OK], 4)


def test_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write .*file/p.csv"):
        PredictionWriter(tmp_path / "file" / "p.csv", LABELS)


def _intact(tmp_path, preds=(OK, ERR)):
    out = tmp_path / "p.csv"
    out.write_text(HEADER + format_rows(list(preds), 4), encoding="utf-8")
    return out


def test_scan_intact_file(tmp_path):
    out = _intact(tmp_path)
    run = scan_existing(out, LABELS)
    assert (run.done, run.ok, run.errors, run.good_bytes, run.torn_bytes) == ({"a/x.jpg", "b.jpg"}, 1, 1, out.stat().st_size, 0)


def test_scan_tallies_true_and_predicted_labels_of_ok_rows(tmp_path):
    rows = [
        Prediction("a.jpg", "EOSINOPHIL", 0.9, [0.9, 0.1, 0.0, 0.0], "EOSINOPHIL"),
        Prediction("b.jpg", "EOSINOPHIL", 0.6, [0.6, 0.4, 0.0, 0.0], "LYMPHOCYTE"),
        Prediction("c.jpg", "EOSINOPHIL", 0.6, [0.6, 0.4, 0.0, 0.0], "LYMPHOCYTE"),
        Prediction("d.jpg", "MONOCYTE", 0.7, [0.1, 0.1, 0.7, 0.1], ""),  # no truth: not tallied
        Prediction("e.jpg", true_label="NEUTROPHIL", status="error", error="empty file"),  # no prediction: not tallied
    ]
    run = scan_existing(_intact(tmp_path, rows), LABELS)
    assert dict(run.truth_pairs) == {("EOSINOPHIL", "EOSINOPHIL"): 1, ("LYMPHOCYTE", "EOSINOPHIL"): 2}
    assert (run.ok, run.errors) == (4, 1)


@pytest.mark.parametrize(
    "tail",
    [
        "c.jpg,EOSI",  # cut mid-field
        "c.jpg,EOSINOPHIL,0.9,0.9,0.0,0.0,0.1,,ok,",  # whole row but no newline yet
        '"new\nline.jpg",EOSINOPHIL',  # cut after a newline inside a quoted path
        '"unterminated',
        "c.jpg,EOSINOPHIL,0.9,0.9\n",  # a short row that ends in a newline (a torn batch write)
    ],
)
def test_torn_tail_is_found_and_cut(tmp_path, tail):
    out = _intact(tmp_path)
    good = out.stat().st_size
    with open(out, "a", encoding="utf-8", newline="") as f:
        f.write(tail)
    run = scan_existing(out, LABELS)
    assert run.done == {"a/x.jpg", "b.jpg"}
    assert (run.good_bytes, run.torn_bytes) == (good, len(tail.encode()))
    truncate_torn_tail(out, run.good_bytes)
    assert out.read_text() == HEADER + format_rows([OK, ERR], 4)


def test_multiline_path_rows_count_as_whole(tmp_path):
    p = Prediction("new\nline.jpg", "EOSINOPHIL", 0.5, [0.5, 0.5, 0.0, 0.0])
    out = _intact(tmp_path, [OK, p])
    run = scan_existing(out, LABELS)
    assert run.done == {"a/x.jpg", "new\nline.jpg"} and run.torn_bytes == 0


def test_scan_torn_header_and_empty_file(tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("path,label,conf")
    run = scan_existing(out, LABELS)
    assert (run.done, run.good_bytes, run.torn_bytes) == (set(), 0, len("path,label,conf"))
    out.write_text("")
    assert scan_existing(out, LABELS).good_bytes == 0


def test_scan_refuses_other_columns(tmp_path):
    out = _intact(tmp_path)
    with pytest.raises(OutputError, match="written by a different model"):
        scan_existing(out, ("A", "B"))


def test_sidecar(tmp_path):
    out = tmp_path / "p.csv"
    assert sidecar_path(out) == tmp_path / "p.csv.run.json"
    assert read_sidecar(out) is None
    write_sidecar(out, {"model": {"sha256": "abc"}, "n": 1})
    assert read_sidecar(out) == {"model": {"sha256": "abc"}, "n": 1}
    assert json.loads(sidecar_path(out).read_text())["n"] == 1
    assert not (tmp_path / "p.csv.run.json.tmp").exists()
    sidecar_path(out).write_text("{torn")
    with pytest.raises(OutputError, match=r"p\.csv\.run\.json is unreadable"):
        read_sidecar(out)


TRUSTED = Prediction("a/x.jpg", "MONOCYTE", 0.7, [0.1, 0.05, 0.7, 0.15], "MONOCYTE", ood_score=12.5, in_domain=False)


def test_columns_of_a_model_with_a_domain_check():
    assert columns(LABELS) == HEADER.strip().split(",")  # an older model: exactly the columns it always had
    assert columns(LABELS, domain=True)[:7] == ["path", "label", "confidence", "risk", "ood_score", "in_domain", "prob_EOSINOPHIL"]
    assert format_rows([TRUSTED, ERR], 4, domain=True) == (
        "a/x.jpg,MONOCYTE,0.700000,0.300000,12.500000,false,0.100000,0.050000,0.700000,0.150000,MONOCYTE,ok,\n"
        "b.jpg,,,,,,,,,,,error,truncated image: cut short\n"
    )


def test_resume_scan_of_a_domain_csv_counts_the_out_of_domain_rows(tmp_path):
    out = tmp_path / "p.csv"
    inside = Prediction("c.jpg", "MONOCYTE", 0.9, [0.0, 0.1, 0.9, 0.0], ood_score=0.5, in_domain=True)
    with PredictionWriter(out, LABELS, domain=True) as w:
        w.write([TRUSTED, ERR, inside])
    run = scan_existing(out, LABELS, domain=True)
    assert (run.ok, run.errors, run.out_of_domain, run.torn_bytes) == (2, 1, 1, 0)
    with pytest.raises(OutputError, match="written by a different model"):
        scan_existing(out, LABELS)  # the same labels without the check: another model
    with pytest.raises(OutputError, match="written by a different model"):
        scan_existing(_intact(tmp_path), LABELS, domain=True)  # an older model's CSV (rewrites p.csv)
