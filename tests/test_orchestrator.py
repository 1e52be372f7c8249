"""wbc_batch.inference.orchestrator: a whole run to a CSV: one row per file, output safety, --resume, the sidecar."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, build_color_model, color_model_reference, sample_images
from PIL import Image

from wbc_batch.errors import UsageError
from wbc_batch.inference.local_engine import RunnerOptions
from wbc_batch.inference.model import load_model
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify
from wbc_batch.inference.predictions import OutputError, sidecar_path
from wbc_batch.inference.preprocess import load_image
from wbc_batch.inference.truth import LabelsError

JPEG = sample_images()[0]
ONE = RunnerOptions(in_process=True, batch_size=4)  # orchestration, not worker isolation (test_local_engine, test_pool): no worker start-up per test


def read_rows(path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.DictReader(f))


def _cfg(inputs, out, model, **kw) -> ClassifyConfig:
    return ClassifyConfig(inputs=[str(p) for p in inputs], output=str(out), model=str(model), runner=kw.pop("runner", ONE), progress="none", **kw)


def make_bad_inputs(d: Path) -> dict[str, str]:
    """One file per bad kind (and per convertible mode): name -> expected status/reason prefix."""
    d.mkdir(parents=True, exist_ok=True)
    data = JPEG.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[400:600] = bytes(200)
    (d / "corrupt.jpg").write_bytes(bytes(corrupt))
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image\n")
    (d / "dangling.jpg").symlink_to(d / "does-not-exist.jpg")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    (d / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    Image.open(JPEG).convert("L").save(d / "gray.png")
    Image.open(JPEG).convert("RGBA").save(d / "rgba.png")
    Image.open(JPEG).convert("P").save(d / "palette.png")
    Image.open(JPEG).convert("P").save(d / "palette_t.png", transparency=0)
    Image.fromarray(np.asarray(Image.open(JPEG).convert("L"), np.uint16) * 257).save(d / "gray16.png")
    Image.open(JPEG).convert("CMYK").save(d / "cmyk.jpg")
    shutil.copy(JPEG, d / "real.jpeg")
    return {
        "bomb.png": "error:image too large",
        "cmyk.jpg": "ok",
        "corrupt.jpg": "error:corrupt image: broken data stream",
        "dangling.jpg": "error:unreadable: No such file or directory",
        "empty.jpg": "error:empty file",
        "gray.png": "ok",
        "gray16.png": "ok",
        "notes.jpg": "error:not an image (format not recognised)",
        "palette.png": "ok",
        "palette_t.png": "ok",
        "real.jpeg": "ok",
        "rgba.png": "ok",
        "truncated.jpg": "error:truncated image: image file is truncated",
    }


def test_every_bad_input_is_one_error_row_and_the_run_goes_on(tmp_path, color_model):
    expected = make_bad_inputs(tmp_path / "in")
    summary = run_classify(_cfg([tmp_path / "in"], tmp_path / "p.csv", color_model))
    rows = read_rows(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == sorted(expected)
    for r in rows:
        want = expected[r["path"]]
        if want == "ok":
            assert (r["status"], r["error"]) == ("ok", ""), r
            assert r["label"] in LABELS and float(r["confidence"]) > 0
        else:
            assert r["status"] == "error" and r["error"].startswith(want.split(":", 1)[1]), r
            assert r["label"] == r["confidence"] == "" and all(r[f"prob_{lb}"] == "" for lb in LABELS)
    n_err = sum(v != "ok" for v in expected.values())
    assert (summary.files, summary.ok, summary.errors, summary.processed) == (13, 13 - n_err, n_err, 13)


def test_converted_modes_classify_like_their_rgb_pixels(tmp_path, color_model):
    """The gray16 file (gray * 257) must give the same probabilities as the 8-bit gray file."""
    make_bad_inputs(tmp_path / "in")
    run_classify(_cfg([tmp_path / "in"], tmp_path / "p.csv", color_model))
    rows = {r["path"]: r for r in read_rows(tmp_path / "p.csv")}
    probs = lambda name: [rows[name][f"prob_{lb}"] for lb in LABELS]  # noqa: E731
    assert probs("gray16.png") == probs("gray.png")
    assert probs("palette.png") != probs("gray.png")  # colour survives the palette


def test_probabilities_equal_the_reference_and_summary(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    seen: list[int] = []
    summary = run_classify(_cfg([sample_copy], out, color_model), on_batch=lambda preds: seen.append(len(preds)))
    assert seen == [4] * 10
    rows = read_rows(out)
    assert len(rows) == 40 and len({r["path"] for r in rows}) == 40
    spec = load_model(color_model, threads=1).metadata.preprocess
    for r in rows:
        ref = color_model_reference(load_image(sample_copy / r["path"], spec)[None])[0]
        got = np.array([float(r[f"prob_{lb}"]) for lb in LABELS])
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert r["label"] == LABELS[int(np.argmax(ref))] and float(r["confidence"]) == pytest.approx(ref.max(), abs=1e-5)
        assert r["true_label"] == r["path"].split("/")[0] and r["status"] == "ok"
    assert (summary.files, summary.ok, summary.errors, summary.resumed, summary.interrupted) == (40, 40, 0, 0, False)
    side = json.loads(sidecar_path(out).read_text())
    assert side["state"] == "finished" and side["root"] == str(sample_copy)
    assert side["model"]["sha256"] == summary.model_sha256 == load_model(color_model, threads=1).sha256
    assert side["summary"]["files"] == 40


def test_output_exists_refused_then_overwrite(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    out.write_text("precious\n")
    with pytest.raises(OutputError, match="exists: use --resume to continue that run, or --overwrite to replace it"):
        run_classify(_cfg([sample_copy], out, color_model))
    assert out.read_text() == "precious\n"
    run_classify(_cfg([sample_copy], out, color_model, overwrite=True))
    assert len(read_rows(out)) == 40
    with pytest.raises(OutputError, match="is a directory"):
        run_classify(_cfg([sample_copy], tmp_path, color_model))


def _first_rows(tmp_path, color_model, sample_copy, n_batches: int) -> Path:
    """A run stopped after ``n_batches`` batches (KeyboardInterrupt from the callback)."""
    out = tmp_path / "p.csv"
    count = []

    def stop(preds):
        count.append(1)
        if len(count) == n_batches:
            raise KeyboardInterrupt

    s = run_classify(_cfg([sample_copy], out, color_model), on_batch=stop)
    assert s.interrupted and s.processed == 4 * n_batches
    assert json.loads(sidecar_path(out).read_text())["state"] == "interrupted"
    return out


def test_interrupt_then_resume_gives_one_row_per_file(tmp_path, color_model, sample_copy):
    full = tmp_path / "full.csv"
    run_classify(_cfg([sample_copy], full, color_model))
    out = _first_rows(tmp_path, color_model, sample_copy, 3)
    assert len(read_rows(out)) == 12
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert (s.resumed, s.processed, s.files, s.ok) == (12, 28, 40, 40)
    assert out.read_text() == full.read_text()  # same rows, same order
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True))  # nothing left to do
    assert (s.resumed, s.processed, s.files) == (40, 0, 40)
    assert out.read_text() == full.read_text()


def test_resume_cuts_a_torn_last_line(tmp_path, color_model, sample_copy):
    full = tmp_path / "full.csv"
    run_classify(_cfg([sample_copy], full, color_model))
    out = _first_rows(tmp_path, color_model, sample_copy, 2)
    lines = full.read_text().splitlines(keepends=True)
    with open(out, "a", encoding="utf-8", newline="") as f:
        f.write(lines[9][:25])  # the 9th row, torn mid-write (no newline)
    s = run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert (s.resumed, s.processed) == (8, 32)
    text = out.read_text()
    assert text == full.read_text()
    rows = read_rows(out)
    assert len(rows) == 40 and len({r["path"] for r in rows}) == 40


def test_resume_refused_for_another_model(tmp_path, color_model, sample_copy):
    out = _first_rows(tmp_path, color_model, sample_copy, 1)
    before = out.read_bytes()
    other = build_color_model(tmp_path / "other.onnx", labels=LABELS, height=16, width=16)
    with pytest.raises(OutputError, match=r"cannot resume: .*p\.csv was written by model 'color-test' \(sha256 [0-9a-f]{12}\.\.\.\), not by other\.onnx"):
        run_classify(_cfg([sample_copy], out, other, resume=True))
    assert out.read_bytes() == before


def test_resume_refused_without_sidecar_or_for_another_root(tmp_path, color_model, sample_copy):
    out = _first_rows(tmp_path, color_model, sample_copy, 1)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(sample_copy, elsewhere)
    with pytest.raises(OutputError, match=f"was written for input root {sample_copy}, not {elsewhere}"):
        run_classify(_cfg([elsewhere], out, color_model, resume=True))
    sidecar_path(out).unlink()
    with pytest.raises(OutputError, match=r"cannot resume: .*p\.csv\.run\.json \(which names the model that wrote .*\) is missing"):
        run_classify(_cfg([sample_copy], out, color_model, resume=True))


def test_resume_with_nothing_there_starts_fresh(tmp_path, color_model, sample_copy):
    s = run_classify(_cfg([sample_copy], tmp_path / "new.csv", color_model, resume=True))
    assert (s.resumed, s.files) == (0, 40)


def test_resume_refuses_a_csv_with_other_columns(tmp_path, color_model, sample_copy):
    out = _first_rows(tmp_path, color_model, sample_copy, 1)
    text = out.read_text().replace("prob_MONOCYTE", "prob_BASOPHIL", 1)
    out.write_text(text)
    with pytest.raises(OutputError, match="written by a different model"):
        run_classify(_cfg([sample_copy], out, color_model, resume=True))


def test_labels_csv_gives_true_labels(tmp_path, color_model):
    d = tmp_path / "slide1"
    d.mkdir()
    shutil.copy(JPEG, d / "a.jpeg")
    shutil.copy(JPEG, d / "b.jpeg")
    (d / "NEUTROPHIL").mkdir()
    shutil.copy(JPEG, d / "NEUTROPHIL" / "c.jpeg")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\na.jpeg,monocyte\n{d}/NEUTROPHIL/c.jpeg,EOSINOPHIL\n")
    run_classify(_cfg([d], tmp_path / "p.csv", color_model, labels_csv=str(labels)))
    assert {r["path"]: r["true_label"] for r in read_rows(tmp_path / "p.csv")} == {
        "a.jpeg": "MONOCYTE",
        "b.jpeg": "",
        "NEUTROPHIL/c.jpeg": "EOSINOPHIL",  # the table wins over the folder name
    }


def test_bad_labels_csv_touches_nothing(tmp_path, color_model, sample_copy):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.jpeg,BASOPHIL\n")
    with pytest.raises(LabelsError, match="'BASOPHIL' is neither one of the model's labels"):
        run_classify(_cfg([sample_copy], tmp_path / "p.csv", color_model, labels_csv=str(labels)))
    assert not (tmp_path / "p.csv").exists() and not sidecar_path(tmp_path / "p.csv").exists()
    # ... including a resumable run's torn tail, which stays for the real resume to judge.
    out = _first_rows(tmp_path, color_model, sample_copy, 1)
    with open(out, "a") as f:
        f.write("torn")
    before = out.read_bytes()
    with pytest.raises(LabelsError):
        run_classify(_cfg([sample_copy], out, color_model, labels_csv=str(labels), resume=True))
    assert out.read_bytes() == before


def test_awkward_paths_round_trip_and_resume(tmp_path, color_model):
    d = tmp_path / "in"
    names = ["comma,name.jpg", 'quo"te.jpg', "sp ace/two  spaces.jpg", "ä/细胞.jpg", "new\nline.jpg", "cr\rname.jpg", "caf\udce4.jpg"]
    for n in names:
        p = d / n
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(JPEG, p)
    run_classify(_cfg([d], tmp_path / "p.csv", color_model))
    rows = read_rows(tmp_path / "p.csv")
    assert sorted(r["path"] for r in rows) == sorted(names)
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:  # the path column opens the file
        assert os.path.isfile(d / r["path"])
    s = run_classify(_cfg([d], tmp_path / "p.csv", color_model, resume=True))
    assert (s.resumed, s.processed) == (len(names), 0)


def test_nested_inputs_do_not_duplicate_rows(tmp_path, color_model, sample_copy):
    inputs = [sample_copy, sample_copy / "MONOCYTE", sample_copy / "MONOCYTE" / "_0_1123.jpeg", sample_copy / "missing.jpg"]
    run_classify(_cfg(inputs, tmp_path / "p.csv", color_model))
    rows = read_rows(tmp_path / "p.csv")
    assert len(rows) == len({r["path"] for r in rows}) == 41
    assert [(r["path"], r["error"]) for r in rows if r["status"] == "error"] == [("missing.jpg", "unreadable: No such file or directory")]


def test_no_images_and_all_bad(tmp_path, color_model):
    (tmp_path / "empty").mkdir()
    s = run_classify(_cfg([tmp_path / "empty"], tmp_path / "p.csv", color_model))
    assert (s.files, s.ok) == (0, 0)
    # Nothing found, nothing written: no header-only CSV and no sidecar to block the next run.
    assert not (tmp_path / "p.csv").exists() and not sidecar_path(tmp_path / "p.csv").exists()
    (tmp_path / "kept.csv").write_text("an earlier run\n")
    s = run_classify(_cfg([tmp_path / "empty"], tmp_path / "kept.csv", color_model, overwrite=True))
    assert s.files == 0 and (tmp_path / "kept.csv").read_text() == "an earlier run\n"
    make_bad_inputs(tmp_path / "bad")
    for ok in ["cmyk.jpg", "gray.png", "gray16.png", "palette.png", "palette_t.png", "real.jpeg", "rgba.png"]:
        (tmp_path / "bad" / ok).unlink()
    s = run_classify(_cfg([tmp_path / "bad"], tmp_path / "p2.csv", color_model))
    assert (s.files, s.ok, s.errors) == (6, 0, 6)


def test_resume_and_overwrite_together_is_a_usage_error(tmp_path, color_model):
    with pytest.raises(UsageError, match=r"^--resume and --overwrite contradict each other: --resume continues OUTPUT, --overwrite replaces it; give one$"):
        _cfg([tmp_path], tmp_path / "p.csv", color_model, resume=True, overwrite=True)


def _confusion(rows: list[dict[str, str]]) -> list[list[int]]:
    return [[sum(r["status"] == "ok" and (r["true_label"], r["label"]) == (t, p) for r in rows) for p in LABELS] for t in LABELS]


def test_summary_confusion_counts_the_whole_csv_including_resumed_rows(tmp_path, color_model, sample_copy):
    (sample_copy / "bad.jpg").write_bytes(b"")  # an error row: not counted
    (sample_copy / "unlabelled").mkdir()
    shutil.copy(JPEG, sample_copy / "unlabelled" / "x.jpeg")  # no true label: not counted
    full = run_classify(_cfg([sample_copy], tmp_path / "full.csv", color_model))
    want = _confusion(read_rows(tmp_path / "full.csv"))
    assert sum(map(sum, want)) == 40 and full.labels == list(LABELS)
    assert full.confusion == want
    out = _first_rows(tmp_path, color_model, sample_copy, 3)
    resumed = run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert (resumed.resumed, resumed.files) == (12, 42)
    assert resumed.confusion == want
    assert json.loads(sidecar_path(out).read_text())["summary"]["confusion"] == want


def test_summary_without_truth_has_no_confusion(tmp_path, color_model):
    d = tmp_path / "slide"
    d.mkdir()
    shutil.copy(JPEG, d / "a.jpeg")
    s = run_classify(_cfg([d], tmp_path / "p.csv", color_model))
    assert (s.files, s.confusion) == (1, [])
    assert s.line().startswith("files 1  ok 1  errors 0  ") and "accuracy" not in s.line()
    assert s.line("accuracy 1.000").startswith("files 1  ok 1  errors 0  accuracy 1.000  ")


def _non_cells(d: Path) -> list[Path]:
    """Flat-colour fields: nothing like a blood smear."""
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rgb in enumerate([(0, 0, 255), (255, 255, 0), (0, 255, 0), (20, 20, 20), (255, 0, 0)]):
        Image.new("RGB", (320, 240), rgb).save(d / f"flat_{i}.png")
        paths.append(d / f"flat_{i}.png")
    return paths


@pytest.mark.parametrize("workers", [1, 2])
def test_a_model_with_a_domain_check_writes_its_columns(tmp_path, trust_model, sample_copy, workers):
    """ood_score and in_domain are the graph's, risk is 1 - confidence; through worker processes too."""
    from conftest import TRUST_OUT_OF_DOMAIN, trust_reference

    out = tmp_path / "p.csv"
    s = run_classify(_cfg([sample_copy], out, trust_model, runner=RunnerOptions(workers=workers, batch_size=4)))
    rows = read_rows(out)
    assert list(rows[0])[:7] == ["path", "label", "confidence", "risk", "ood_score", "in_domain", "prob_EOSINOPHIL"]
    probs, scores = trust_reference(trust_model, [sample_copy / r["path"] for r in rows])
    threshold = load_model(trust_model).metadata.domain.threshold
    for r, p, sc in zip(rows, probs, scores, strict=True):
        assert float(r["ood_score"]) == pytest.approx(float(sc), abs=5e-7)
        assert r["in_domain"] == ("true" if sc <= threshold else "false")
        assert r["confidence"] == f"{p.max():.6f}" and float(r["risk"]) == pytest.approx(1 - p.max(), abs=1e-6)
    assert s.domain_checked and s.out_of_domain == TRUST_OUT_OF_DOMAIN == sum(r["in_domain"] == "false" for r in rows)
    assert "out of domain 4" in s.line() and s.domain_warning() is None  # 4 of 40: not above 10%
    assert json.loads(sidecar_path(out).read_text())["model"]["trust"]["domain"]["threshold"] == threshold


def test_an_older_model_writes_no_domain_columns(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    s = run_classify(_cfg([sample_copy], out, color_model))
    assert not {"risk", "ood_score", "in_domain"} & set(read_rows(out)[0])
    assert not s.domain_checked and "out of domain" not in s.line() and s.domain_warning() is None
    assert "trust" not in json.loads(sidecar_path(out).read_text())["model"]


def test_many_out_of_domain_images_warn_and_resume_keeps_the_count(tmp_path, trust_model, sample_copy):
    from conftest import TRUST_OUT_OF_DOMAIN, trust_reference

    flats = _non_cells(sample_copy / "zz_flat")
    _, scores = trust_reference(trust_model, flats)
    assert (scores > load_model(trust_model).metadata.domain.threshold).all()  # every flat field is flagged
    full = tmp_path / "full.csv"
    s = run_classify(_cfg([sample_copy], full, trust_model))
    assert (s.ok, s.out_of_domain) == (45, TRUST_OUT_OF_DOMAIN + 5)
    assert s.domain_warning().startswith("9 of 45 images (20%) are out of domain")
    out = _first_rows(tmp_path, trust_model, sample_copy, 3)
    s = run_classify(_cfg([sample_copy], out, trust_model, resume=True))
    assert (s.resumed, s.out_of_domain) == (12, 9) and out.read_text() == full.read_text()


def test_resume_refuses_a_csv_of_the_same_labels_without_the_domain_columns(tmp_path, color_model, trust_model, sample_copy):
    out = tmp_path / "p.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    side = json.loads(sidecar_path(out).read_text())
    side["model"]["sha256"] = load_model(trust_model).sha256  # even with the sidecar's blessing
    sidecar_path(out).write_text(json.dumps(side))
    with pytest.raises(OutputError, match="written by a different model"):
        run_classify(_cfg([sample_copy], out, trust_model, resume=True))


def test_python_api_yields_the_domain_check(trust_model):
    from conftest import SAMPLE, TRUST_OUT_OF_DOMAIN

    from wbc_batch import classify

    preds = list(classify(SAMPLE, trust_model, options=ONE))
    assert len(preds) == 40 and sum(p.in_domain is False for p in preds) == TRUST_OUT_OF_DOMAIN
    assert all(p.ood_score is not None and p.risk == pytest.approx(1 - p.confidence) for p in preds)


#: File and folder names that a spreadsheet would read as formulas, one per first character.
FORMULA_FIRSTS = ("=", "+", "-", "@", "\t", "\r")


def make_formula_tree(d: Path) -> list[str]:
    """Folders and files whose names start with each formula character (and a live-link folder): their run-relative paths."""
    rels = [f"{c}slide/{c}cell.jpeg" for c in FORMULA_FIRSTS] + [f"{c}top.jpeg" for c in FORMULA_FIRSTS]
    rels += ['=HYPERLINK("http:\\\\x","open")/a.jpeg', "EOSINOPHIL/-1.jpeg"]
    for rel in rels:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(JPEG, d / rel)
    return sorted(rels)


def test_formula_names_are_written_so_no_cell_starts_a_formula_and_resume_is_a_no_op(tmp_path, color_model):
    d = tmp_path / "in"
    rels = make_formula_tree(d)
    out = tmp_path / "p.csv"
    run_classify(_cfg([d], out, color_model))
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(p if p[0] not in FORMULA_FIRSTS else "./" + p for p in rels)
    assert all(os.path.isfile(d / r["path"]) for r in rows)  # still the file, relative to the input root
    with open(out, encoding="utf-8", newline="") as f:
        assert not [c for rec in csv.reader(f) for c in rec if c[:1] in FORMULA_FIRSTS]
    before = out.read_bytes()
    s = run_classify(_cfg([d], out, color_model, resume=True))
    assert (s.resumed, s.processed, s.files, s.stale) == (len(rels), 0, len(rels), 0)
    assert out.read_bytes() == before


def test_resume_refuses_repeated_rows_and_leaves_the_csv_as_it_was(tmp_path, color_model, sample_copy):
    out = tmp_path / "p.csv"
    run_classify(_cfg([sample_copy], out, color_model))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:21] + lines[1:11] + lines[21:]))  # 10 rows copied into the middle
    before = out.read_bytes()
    with pytest.raises(OutputError) as e:
        run_classify(_cfg([sample_copy], out, color_model, resume=True))
    assert e.value.exit_code == 5
    assert f"cannot resume: {out} has 10 row(s) that no wbc-batch run writes: line 22: " in str(e.value)
    assert "(first on line 2)" in str(e.value) and "line 31: " in str(e.value)
    assert out.read_bytes() == before
