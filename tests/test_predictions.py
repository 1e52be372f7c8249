"""wbc_batch.inference.predictions: CSV columns and rows, the incremental writer, --resume scanning, the sidecar."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import LABELS

from wbc_batch.inference import predictions
from wbc_batch.inference.predictions import (
    COLUMNS,
    Column,
    OutputError,
    Prediction,
    PredictionWriter,
    Schema,
    columns,
    drop_rows,
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
    assert format_rows([OK, ERR], LABELS) == (
        "a/x.jpg,MONOCYTE,0.700000,0.100000,0.050000,0.700000,0.150000,MONOCYTE,ok,\nb.jpg,,,,,,,,error,truncated image: cut short\n"
    )


def test_the_schema_reads_records_by_name():
    schema = Schema(tuple(LABELS), domain=True)
    assert schema.names == columns(LABELS, domain=True) and schema.header() == format_header(LABELS, domain=True)
    rec = next(csv.reader([schema.format([TRUSTED])]))
    assert (schema.path(rec), schema.status(rec), schema.value(rec, "in_domain"), schema.value(rec, "prob_MONOCYTE")) == (
        "a/x.jpg", "ok", "false", "0.700000")
    assert schema.path(next(csv.reader([schema.format([Prediction("=x.jpg", status="error", error="e")])]))) == "=x.jpg"
    assert [c.name for c in COLUMNS if c.domain] == ["risk", "ood_score", "in_domain"]


@pytest.mark.parametrize("domain", [False, True])
def test_every_row_the_writer_writes_passes_the_resume_check(domain):
    schema = Schema(tuple(LABELS), domain)
    for p in (TRUSTED, ERR, Prediction("c.jpg", "EOSINOPHIL", 1.0, [1.0, 0.0, 0.0, 0.0], ood_score=0.0, in_domain=True)):
        assert schema.problem(next(csv.reader([schema.format([p])]))) is None


def test_a_column_added_to_the_table_is_written_checked_and_resumed(tmp_path, monkeypatch):
    entropy = Column("entropy", lambda p: "" if "entropy" not in p.values else f"{p.values['entropy']:.6f}",
                     ok=predictions._number, blank_on_error=True)
    monkeypatch.setattr(predictions, "COLUMNS", (*COLUMNS[:-3], entropy, *COLUMNS[-3:]))
    out = tmp_path / "p.csv"
    with PredictionWriter(out, LABELS) as w:
        w.write([Prediction("a.jpg", "MONOCYTE", 0.7, [0.1, 0.05, 0.7, 0.15], values={"entropy": 0.5}), ERR])
    assert out.read_text().splitlines() == [
        HEADER.strip().replace(",true_label", ",entropy,true_label"),
        "a.jpg,MONOCYTE,0.700000,0.100000,0.050000,0.700000,0.150000,0.500000,,ok,",
        "b.jpg,,,,,,,,,error,truncated image: cut short",
    ]
    assert (scan_existing(out, LABELS).ok, scan_existing(out, LABELS).errors) == (1, 1)
    out.write_text(out.read_text().replace("0.500000", "many"))
    with pytest.raises(OutputError, match="line 2: entropy 'many' is not a number"):
        scan_existing(out, LABELS)


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
    assert out.read_text() == HEADER + format_rows([OK], LABELS)  # readable before close
    w.close()


def test_append_does_not_repeat_the_header(tmp_path):
    out = tmp_path / "p.csv"
    with PredictionWriter(out, LABELS) as w:
        w.write([OK])
    with PredictionWriter(out, LABELS, append=True) as w:
        w.write([ERR])
    assert out.read_text() == HEADER + format_rows([OK, ERR], LABELS)
    out.write_text("")
    with PredictionWriter(out, LABELS, append=True) as w:  # an empty file gets its header
        w.write([OK])
    assert out.read_text() == HEADER + format_rows([OK], LABELS)


def test_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write .*file/p.csv"):
        PredictionWriter(tmp_path / "file" / "p.csv", LABELS)


def _intact(tmp_path, preds=(OK, ERR)):
    out = tmp_path / "p.csv"
    out.write_text(HEADER + format_rows(list(preds), LABELS), encoding="utf-8")
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
    assert out.read_text() == HEADER + format_rows([OK, ERR], LABELS)


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
    assert format_rows([TRUSTED, ERR], LABELS, domain=True) == (
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


FORMULA_NAMES = [c + name for c in ("=", "+", "-", "@", "\t", "\r") for name in ("x.jpg", "slide/x.jpg")] + ['=HYPERLINK("http:\\\\x","open")/y.jpg']


def test_paths_that_would_start_a_formula_are_written_from_dot_slash_and_read_back(tmp_path):
    out = tmp_path / "p.csv"
    with PredictionWriter(out, LABELS) as w:
        w.write([Prediction(p, "EOSINOPHIL", 1.0, [1.0, 0.0, 0.0, 0.0]) for p in FORMULA_NAMES])
        w.write([Prediction("-err.jpg", status="error", error="empty file")])
    rows = _read(out)
    assert [r[0] for r in rows[1:]] == ["./" + p for p in FORMULA_NAMES] + ["./-err.jpg"]  # the same files, relative to the root
    assert not [c for r in rows for c in r if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    run = scan_existing(out, LABELS)
    assert run.done == {*FORMULA_NAMES, "-err.jpg"} and (run.ok, run.errors, run.torn_bytes) == (len(FORMULA_NAMES), 1, 0)


def _lines(*rows: str) -> str:
    return HEADER + "".join(r + "\n" for r in rows)


ROW_A = "a.jpg,MONOCYTE,0.700000,0.100000,0.050000,0.700000,0.150000,,ok,"
ROW_B = "b.jpg,,,,,,,,error,empty file"
ROW_C = "c.jpg,EOSINOPHIL,0.900000,0.900000,0.050000,0.030000,0.020000,EOSINOPHIL,ok,"


def test_scan_refuses_duplicate_paths_naming_their_lines(tmp_path):
    out = tmp_path / "p.csv"
    out.write_text(_lines(ROW_A, ROW_B, ROW_C, ROW_A, "./" + ROW_C, ROW_A))
    before = out.read_bytes()
    with pytest.raises(OutputError) as e:
        scan_existing(out, LABELS)
    msg = str(e.value)
    assert msg.startswith(f"cannot resume: {out} has 3 row(s) that no wbc-batch run writes: ")
    assert "line 5: 'a.jpg' again (first on line 2)" in msg and "line 6: 'c.jpg' again (first on line 4)" in msg
    assert "line 7: 'a.jpg' again (first on line 2)" in msg
    assert e.value.exit_code == 5 and out.read_bytes() == before


@pytest.mark.parametrize(
    "row, why",
    [
        (ROW_A.replace("MONOCYTE", "FOO", 1), "label 'FOO' is not one of the model's labels"),
        (ROW_A.replace("0.700000", "abc", 1), "confidence 'abc' is not a number from 0 to 1"),
        (ROW_A.replace("0.700000", "1.5", 1), "confidence '1.5' is not a number from 0 to 1"),
        (ROW_A.replace("0.700000", "nan", 1), "confidence 'nan' is not a number from 0 to 1"),
        (ROW_A.replace("0.100000", "-0.1", 1), "prob_EOSINOPHIL '-0.1' is not a number from 0 to 1"),
        (ROW_A.replace(",,ok,", ",BASOPHIL,ok,"), "true_label 'BASOPHIL' is not one of the model's labels"),
        (ROW_A.replace(",ok,", ",done,"), "status 'done' is neither ok nor error"),
        (ROW_B.replace("b.jpg,,", "b.jpg,MONOCYTE,"), "an error row with a label, confidence or probabilities"),
        (ROW_A.replace("a.jpg", ""), "no path"),
        (ROW_A.replace("a.jpg", "\0\0a.jpg"), "a path with NUL bytes"),
        (ROW_A[:30], "4 fields instead of 10"),
        ("", "0 fields instead of 10"),  # a blank line
    ],
)
def test_scan_refuses_a_row_no_run_writes_naming_its_line(tmp_path, row, why):
    out = tmp_path / "p.csv"
    out.write_text(_lines(ROW_B, row, ROW_C), encoding="utf-8")
    before = out.read_bytes()
    with pytest.raises(OutputError) as e:
        scan_existing(out, LABELS)
    assert str(e.value).startswith(f"cannot resume: {out} has 1 row(s) that no wbc-batch run writes: line 3: {why}")
    assert "remove or correct those lines" in str(e.value)
    assert out.read_bytes() == before  # refused, not cut: the rows after it are kept


def test_scan_refuses_bad_domain_columns(tmp_path):
    out = tmp_path / "p.csv"
    with PredictionWriter(out, LABELS, domain=True) as w:
        w.write([TRUSTED, ERR])
    text = out.read_text()
    out.write_text(text.replace(",false,", ",maybe,"))
    with pytest.raises(OutputError, match="line 2: in_domain 'maybe' is neither true nor false"):
        scan_existing(out, LABELS, domain=True)
    out.write_text(text.replace("12.500000", "x"))
    with pytest.raises(OutputError, match="line 2: ood_score 'x' is not a number"):
        scan_existing(out, LABELS, domain=True)


def test_many_bad_rows_are_named_ten_at_a_time(tmp_path):
    out = tmp_path / "p.csv"
    out.write_text(_lines(*[ROW_A] * 25))
    with pytest.raises(OutputError, match=r"has 24 row\(s\) that no wbc-batch run writes: line 3: .* line 12: [^;]*; and 14 more;"):
        scan_existing(out, LABELS)


def test_drop_rows_calls_before_replace_once_the_new_file_is_complete_and_keeps_the_old_if_it_fails(tmp_path):
    out = tmp_path / "p.csv"
    out.write_text(_lines(ROW_A, ROW_B, "./-" + ROW_C))
    before = out.read_bytes()
    seen = []

    def refuse():
        seen.append((tmp_path / "p.csv.rewrite.tmp").read_text())
        raise OutputError("cannot write the sidecar")

    with pytest.raises(OutputError, match="cannot write the sidecar"):
        drop_rows(out, lambda rec: rec[-2] == "error", before_replace=refuse)
    assert seen == [_lines(ROW_A, "./-" + ROW_C)] and out.read_bytes() == before and not (tmp_path / "p.csv.rewrite.tmp").exists()
    assert drop_rows(out, lambda rec: rec[-2] == "error", before_replace=lambda: seen.append("ok")) == [ROW_B.split(",")]
    assert out.read_text() == _lines(ROW_A, "./-" + ROW_C) and seen[-1] == "ok"
