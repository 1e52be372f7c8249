"""wbc-batch report: metrics.json against scikit-learn, the HTML, the differential, the CLI."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LABELS, ROOT, SAMPLE, build_color_model, dump_dom, needs_chromium

from wbc_batch.cli import main
from wbc_batch.evaluation import report as report_mod
from wbc_batch.evaluation.report import ReportLimits, write_report
from wbc_batch.inference.local_engine import RunnerOptions
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify
from wbc_batch.inference.predictions import Prediction, PredictionWriter, read_sidecar, write_sidecar

sk = pytest.importorskip("sklearn.metrics")
CORRUPT = "EOSINOPHIL/broken.jpeg"


def classify(inputs: Path, model: Path, out: Path) -> Path:
    summary = run_classify(
        ClassifyConfig(inputs=[str(inputs)], output=str(out), model=str(model), runner=RunnerOptions(workers=1), progress="none")
    )
    assert summary.ok > 0
    return out


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, color_model):
    """Predictions of the colour model on a copy of sample_data/ plus one corrupt file."""
    d = tmp_path_factory.mktemp("sample_run")
    inp = d / "in"
    shutil.copytree(SAMPLE, inp, ignore=shutil.ignore_patterns("README*"))
    (inp / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return classify(inp, color_model, d / "pred.csv")


@pytest.fixture(scope="module")
def sample_report(sample_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(sample_run, out, review_threshold=0.86, on_warning=None), sample_run


def _check_metrics_against_sklearn(m: dict, rows: list[dict]) -> None:
    ok = [r for r in rows if r["status"] == "ok" and r["true_label"]]
    t = [r["true_label"] for r in ok]
    p = [r["label"] for r in ok]
    labels = list(m["labels"])
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(t, p))
    present = [lb for lb in labels if lb in set(t)]  # macro averages are over the classes the truth holds
    assert m["macro_over"] == present
    assert m["macro_f1"] == pytest.approx(sk.f1_score(t, p, labels=present, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(sk.f1_score(t, p, labels=labels, average="weighted", zero_division=0))
    assert m["confusion_matrix"] == sk.confusion_matrix(t, p, labels=labels).tolist()
    np.testing.assert_allclose(m["confusion_matrix_normalized"], sk.confusion_matrix(t, p, labels=labels, normalize="true"), atol=1e-6)
    pr, rc, f1, sup = sk.precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    for i, lb in enumerate(labels):
        pc = m["per_class"][lb]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == (
            pytest.approx(pr[i]),
            pytest.approx(rc[i]),
            pytest.approx(f1[i]),
            sup[i],
        )
        assert pc["predicted"] == sum(r["label"] == lb for r in rows if r["status"] == "ok")


# --------------------------------------------------------------------------- real sample run


def test_metrics_json_matches_sklearn(sample_report):
    paths, csv_path = sample_report
    m = json.loads(paths["metrics"].read_text())
    rows = read_rows(csv_path)
    side = read_sidecar(csv_path)
    assert m["labels"] == list(LABELS)
    _check_metrics_against_sklearn(m, rows)
    assert m["counts"]["files"] == len(rows) == 41
    assert m["counts"]["ok"] == 40 and m["counts"]["errors"] == 1 and m["counts"]["without_truth"] == 0
    assert m["counts"]["low_confidence"] == sum(r["status"] == "ok" and float(r["confidence"]) < 0.86 for r in rows) > 0
    assert m["model"]["name"] == "color-test"
    assert m["model"]["sha256"] == side["model"]["sha256"] and len(m["model"]["sha256"]) == 64
    assert m["model"]["labels"] == list(LABELS)
    assert m["root"] == side["root"]
    assert m["throughput"]["images_per_s"] == pytest.approx(side["summary"]["images_per_s"])
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", m["date"])
    assert m["has_truth"] is True
    assert m["group_by"] is None and "differential" not in paths  # class folders only: no differential


def test_output_files(sample_report):
    paths, _ = sample_report
    for key in ("html", "metrics", "per_class", "confusion_matrix", "confusion_matrix_normalized", "review"):
        assert paths[key].is_file(), key
    for key in ("confusion_matrix", "confusion_matrix_normalized"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_class = read_rows(paths["per_class"])
    m = json.loads(paths["metrics"].read_text())
    assert [r["label"] for r in per_class] == list(LABELS)
    for r in per_class:
        assert float(r["f1"]) == pytest.approx(m["per_class"][r["label"]]["f1"], abs=1e-6)
        assert int(r["support"]) == m["per_class"][r["label"]]["support"]
    review = read_rows(paths["review"])
    assert len(review) == m["counts"]["low_confidence"]
    assert all(float(r["confidence"]) < 0.86 for r in review)


def test_html_sections_and_self_contained(sample_report):
    paths, csv_path = sample_report
    page = paths["html"].read_text()
    for sec in ("summary", "per-class", "confusion-matrix", "top-confusions", "gallery", "distribution", "review", "failed"):
        assert f'id="{sec}"' in page, sec
    # No external resource of any kind; the only scripts are inline: the review data and the review script.
    assert "http://" not in page and "https://" not in page
    assert re.findall(r"<script\b[^>]*>", page, re.I) == ['<script type="application/json" id="review-data">', "<script>"]
    srcs = re.findall(r'\bsrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"url\((?!data:)", page)
    assert "@import" not in page
    # Both matrices, the per-class table, thumbnails of misclassified images.
    assert page.count('alt="confusion matrix') == 2
    assert 'id="per-class-table"' in page
    gallery = page[page.index('id="gallery"') : page.index('id="distribution"')]
    mistakes = [r for r in read_rows(csv_path) if r["status"] == "ok" and r["label"] != r["true_label"]]
    n_cells = gallery.count('<figure class="cell rv"')
    assert n_cells == min(len(mistakes), 3 * report_mod.GALLERY_PER_PAIR)  # 3 wrong pairs in this run
    assert gallery.count("data:image/jpeg;base64,") == 2 * n_cells  # each: the zoom and the whole field
    assert "true EOSINOPHIL → predicted MONOCYTE" in gallery
    # The failed file, with its error.
    failed = page[page.index('id="failed"') :]
    assert CORRUPT in failed
    err = next(r["error"] for r in read_rows(csv_path) if r["status"] == "error")
    assert err and html.escape(err) in failed
    # The low-confidence review list.
    review = page[page.index('id="review"') : page.index('id="failed"')]
    assert review.count("<tr class=rv ") == json.loads(paths["metrics"].read_text())["counts"]["low_confidence"]


def test_thumbnail_placeholder_when_images_moved(sample_run, tmp_path):
    moved = tmp_path / "pred.csv"
    shutil.copy(sample_run, moved)
    side = read_sidecar(sample_run)
    side["root"] = str(tmp_path / "gone")
    write_sidecar(moved, side)
    paths = write_report(moved, tmp_path / "r", on_warning=None)
    page = paths["html"].read_text()
    assert "image not found" in page
    assert "data:image/jpeg" not in page


def test_no_truth_run_with_slide_folders(tmp_path, color_model):
    """Images in slide folders (not class names): no truth, the differential by slide."""
    inp = tmp_path / "slides"
    imgs = sorted(SAMPLE.rglob("*.jpeg"))
    for i, src in enumerate(imgs):
        dst = inp / ("slide_a" if i % 3 else "slide_b") / f"{i:02d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (inp / "slide_b" / "bad.jpeg").write_bytes(b"garbage")
    csv_path = classify(inp, color_model, tmp_path / "pred.csv")
    paths = write_report(csv_path, tmp_path / "r", review_threshold=0.86, on_warning=None)
    m = json.loads(paths["metrics"].read_text())
    assert m["has_truth"] is False
    assert m["accuracy"] is None and m["macro_f1"] is None and m["confusion_matrix"] is None
    assert m["counts"]["without_truth"] == 40 and m["counts"]["errors"] == 1
    rows = read_rows(csv_path)
    for lb in LABELS:
        assert m["per_class"][lb]["predicted"] == sum(r["label"] == lb for r in rows)
    assert "confusion_matrix" not in paths and not (tmp_path / "r" / "confusion_matrix.png").exists()
    page = paths["html"].read_text()
    for sec in ("per-class-table", "confidence-histogram", "differential", "review", "failed"):
        assert f'id="{sec}"' in page, sec
    for sec in ("confusion-matrix", "gallery", "top-confusions"):
        assert f'id="{sec}"' not in page, sec
    assert "http://" not in page and "https://" not in page
    # Differential chosen automatically: one row per slide.
    assert m["group_by"] == 1
    diff = {r["group"]: r for r in read_rows(paths["differential"])}
    assert set(diff) == {"slide_a", "slide_b"}
    for g, r in diff.items():
        mine = [x for x in rows if x["path"].startswith(g + "/")]
        ok = [x for x in mine if x["status"] == "ok"]
        assert int(r["n"]) == len(mine) and int(r["ok"]) == len(ok)
        assert int(r["errors"]) == len(mine) - len(ok)
        assert int(r["low_confidence"]) == sum(float(x["confidence"]) < 0.86 for x in ok)
        for lb in LABELS:
            c = sum(x["label"] == lb for x in ok)
            assert int(r[f"count_{lb}"]) == c
            assert float(r[f"pct_{lb}"]) == pytest.approx(100 * c / len(ok), abs=0.01)
    assert int(diff["slide_b"]["errors"]) == 1
    # The low-confidence files are listed for review in the HTML.
    low = [x["path"] for x in rows if x["status"] == "ok" and float(x["confidence"]) < 0.86]
    assert low
    review = page[page.index('id="review"') : page.index('id="failed"')]
    assert all(p in review for p in low)
    # ... each with its pictures (the zoom and the whole field), in the unlabelled report too.
    assert review.count("<img ") == 2 * len(low) and all(f'alt="zoom on the cell in {p}"' in review for p in low)
    assert all(r["with_truth"] == "0" and r["accuracy"] == "" and r["true_count_EOSINOPHIL"] == "" for r in diff.values())
    assert "<th class=num>true</th>" not in page and "accuracy" not in page[page.index('id="differential"') :]


def test_group_by_level(tmp_path, color_model):
    """slide/CLASS/img: truth from the class folder, groups from --group-by 1, or deeper."""
    inp = tmp_path / "in"
    for slide in ("s1", "s2"):
        shutil.copytree(SAMPLE, inp / slide, ignore=shutil.ignore_patterns("README*"))
    csv_path = classify(inp, color_model, tmp_path / "pred.csv")
    rows = read_rows(csv_path)
    paths = write_report(csv_path, tmp_path / "auto", on_warning=None)
    m = json.loads(paths["metrics"].read_text())
    assert m["has_truth"] and m["counts"]["files"] == 80
    _check_metrics_against_sklearn(m, rows)
    assert [r["group"] for r in read_rows(paths["differential"])] == ["s1", "s2"]
    _check_per_slide_truth(paths, rows, ["s1", "s2"])
    paths2 = write_report(csv_path, tmp_path / "lvl2", group_by=2, on_warning=None)
    groups = [r["group"] for r in read_rows(paths2["differential"])]
    assert groups == sorted(f"{s}/{lb}" for s in ("s1", "s2") for lb in LABELS)
    assert all(int(r["n"]) == 10 for r in read_rows(paths2["differential"]))
    paths0 = write_report(csv_path, tmp_path / "none", group_by=0, on_warning=None)
    assert "differential" not in paths0 and 'id="differential"' not in paths0["html"].read_text()


def _check_per_slide_truth(paths: dict, rows: list[dict], groups: list[str]) -> None:
    """differential.csv and the HTML table: true counts per class and accuracy per slide, from the CSV rows."""
    diff = {r["group"]: r for r in read_rows(paths["differential"])}
    page = paths["html"].read_text()
    assert list(diff) == groups
    for g in groups:
        ok = [x for x in rows if x["path"].startswith(g + "/") and x["status"] == "ok" and x["true_label"]]
        correct = sum(x["label"] == x["true_label"] for x in ok)
        trues = [sum(x["true_label"] == lb for x in ok) for lb in LABELS]
        assert int(diff[g]["with_truth"]) == len(ok) and int(diff[g]["correct"]) == correct
        assert [int(diff[g][f"true_count_{lb}"]) for lb in LABELS] == trues
        assert float(diff[g]["accuracy"]) == pytest.approx(correct / len(ok), abs=1e-4)
        row = re.search(rf'<tr data-group="{re.escape(g)}">(.*?)</tr>', page, re.S).group(1)
        assert [int(v.replace(",", "")) for v in re.findall(r'<td class="num true">([\d,]+)</td>', row)] == trues
        assert re.findall(r'<td class="num pred">([\d,]+) ', row) == [diff[g][f"count_{lb}"] for lb in LABELS]
        assert re.findall(r'<td class="num acc">([\d.]+)</td>', row) == [f"{correct / len(ok):.3f}"]


def test_group_by_forced_on_class_folders(sample_run, tmp_path):
    paths = write_report(sample_run, tmp_path / "r", group_by=1, on_warning=None)
    diff = read_rows(paths["differential"])
    assert [r["group"] for r in diff] == list(LABELS)
    assert [int(r["n"]) for r in diff] == [11, 10, 10, 10]  # EOSINOPHIL holds the corrupt file
    assert int(diff[0]["errors"]) == 1


def test_without_sidecar(sample_run, tmp_path):
    csv_path = tmp_path / "lone.csv"
    shutil.copy(sample_run, csv_path)
    seen = []
    paths = write_report(csv_path, tmp_path / "r", on_warning=seen.append)
    assert any("run.json" in w for w in seen)
    m = json.loads(paths["metrics"].read_text())
    assert m["labels"] == list(LABELS) and m["model"]["sha256"] is None and m["throughput"]["images_per_s"] is None
    assert m["counts"]["files"] == 41
    assert 'id="gallery"' in paths["html"].read_text()


def test_run_dir_curves(sample_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"])
        for e in range(1, 5):
            w.writerow([e, 1 / e, 0.5 + e / 10, 1.1 / e, 0.45 + e / 10, 0.4 + e / 10, 0.001, 60])
    paths = write_report(sample_run, tmp_path / "r", run_dir=run, on_warning=None)
    assert paths["curves"].read_bytes()[:4] == b"\x89PNG"
    page = paths["html"].read_text()
    assert 'id="training-curves"' in page
    # A curves.png in the run dir is used as it is.
    shutil.copy(paths["curves"], run / "curves.png")
    paths = write_report(sample_run, tmp_path / "r2", run_dir=run, on_warning=None)
    assert paths["curves"] == run / "curves.png"
    assert 'id="training-curves"' in paths["html"].read_text()


def test_without_matplotlib(sample_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    seen = []
    paths = write_report(sample_run, tmp_path / "r", on_warning=seen.append)
    assert any("pip install matplotlib" in w for w in seen)
    assert "confusion_matrix" not in paths and not list((tmp_path / "r").glob("*.png"))
    page = paths["html"].read_text()
    assert 'id="confusion-matrix"' in page and 'id="confusion-table"' in page
    assert "pip install matplotlib" in page and "wbc-batch[" not in page
    m = json.loads(paths["metrics"].read_text())
    assert m["accuracy"] is not None and any("matplotlib" in w for w in m["warnings"])


def test_classify_path_does_not_import_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import wbc_batch.cli, wbc_batch.inference.orchestrator, wbc_batch.evaluation.report, wbc_batch.evaluation.plots\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- larger synthetic CSV


def _synthetic_csv(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of one file each (links to sample_data/'s 40 images under a root beside ``path``)."""
    rng = np.random.default_rng(seed)
    imgs = {lb: sorted((SAMPLE / lb).glob("*.jpeg")) for lb in LABELS}
    root = path.parent / "images"
    for lb in LABELS:
        (root / lb).mkdir(parents=True, exist_ok=True)
    t = rng.choice(4, size=n, p=[0.05, 0.3, 0.1, 0.55])
    logits = rng.normal(0, 1, size=(n, 4))
    logits[np.arange(n), t] += rng.gamma(2.0, 0.8, size=n)
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    preds = []
    for i in range(n):
        lb = LABELS[t[i]]
        rel = f"{lb}/{i:05d}{imgs[lb][i % 10].name}"
        if i % 97 == 5:
            preds.append(Prediction(path=f"{lb}/bad_{i}.jpeg", true_label=lb, status="error", error=f"cannot identify image file #{i}"))
        else:
            (root / rel).symlink_to(imgs[lb][i % 10])
            j = int(prob[i].argmax())
            preds.append(
                Prediction(
                    path=rel, label=LABELS[j], confidence=float(prob[i, j]), probabilities=prob[i].tolist(), true_label=lb if i % 11 else ""
                )
            )
    with PredictionWriter(path, LABELS) as w:
        w.write(preds)
    write_sidecar(
        path,
        {
            "model": {"name": "synthetic", "sha256": "ab" * 32, "labels": list(LABELS), "arch": "x"},
            "root": str(root),
            "summary": {"images_per_s": 123.0},
        },
    )
    return path


def test_synthetic_csv_matches_sklearn_and_caps(tmp_path):
    limits = ReportLimits(gallery_per_pair=3, gallery_max=20, review_max=25, review_images=5, failed_max=10)
    csv_path = _synthetic_csv(tmp_path / "pred.csv", 3000)
    rows = read_rows(csv_path)
    paths = write_report(csv_path, tmp_path / "r", review_threshold=0.6, on_warning=None, limits=limits)
    m = json.loads(paths["metrics"].read_text())
    _check_metrics_against_sklearn(m, rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert m["counts"] == {
        "files": 3000,
        "ok": len(ok),
        "errors": 3000 - len(ok),
        "with_truth": sum(bool(r["true_label"]) for r in ok),
        "without_truth": sum(not r["true_label"] for r in ok),
        "low_confidence": sum(float(r["confidence"]) < 0.6 for r in ok),
        "malformed_rows": 0,
    }
    assert m["throughput"]["images_per_s"] == 123.0
    page = paths["html"].read_text()
    gallery = page[page.index('id="gallery"') : page.index('id="distribution"')]
    assert gallery.count('<figure class="cell rv"') == 20  # gallery_max
    assert gallery.count("data:image/jpeg") == 2 * 20
    assert "not shown" in gallery
    review = page[page.index('id="review"') : page.index('id="failed"')]
    assert review.count("<tr class=rv ") == 25
    assert review.count("<img ") == 2 * 5 and review.count("listed only") == 25 - 5  # review_images=5, the rest by name
    # The listed ones are the least confident (their risk is 1 - confidence); review.csv has them all.
    listed = [1 - float(x) for x in re.findall(r"<td class=num>([01]\.\d+)</td>", review)]
    lows = sorted(float(r["confidence"]) for r in ok if float(r["confidence"]) < 0.6)
    assert listed == pytest.approx(lows[:25], abs=1e-3)
    assert len(read_rows(paths["review"])) == len(lows)
    failed = page[page.index('id="failed"') :]
    assert failed.count("<tr>") - 1 == 10 and "the rest have status=error" in failed
    top = m["top_confusions"]
    assert top == sorted(top, key=lambda x: -x["count"]) and len(top) == 10


def test_synthetic_per_slide_truth(tmp_path):
    """Grouped by the class folders, a group's accuracy is that class's recall; rows without truth are left out of it."""
    csv_path = _synthetic_csv(tmp_path / "pred.csv", 2000, seed=3)
    rows = read_rows(csv_path)
    paths = write_report(csv_path, tmp_path / "r", group_by=1, on_warning=None)
    m = json.loads(paths["metrics"].read_text())
    _check_per_slide_truth(paths, rows, list(LABELS))
    for r in read_rows(paths["differential"]):
        assert float(r["accuracy"]) == pytest.approx(m["per_class"][r["group"]]["recall"], abs=1e-4)
        assert int(r["with_truth"]) == m["per_class"][r["group"]]["support"] < int(r["ok"])


def test_picture_counts_per_section(sample_report):
    """Every gallery cell and every review row (up to review_images) shows the zoom and the field, each click-to-enlarge."""
    paths, csv_path = sample_report
    page = paths["html"].read_text()
    rows = read_rows(csv_path)
    ok = [r for r in rows if r["status"] == "ok"]
    mistakes = [r for r in ok if r["label"] != r["true_label"]]
    low = sorted((r for r in ok if float(r["confidence"]) < 0.86), key=lambda r: float(r["confidence"]))
    assert 0 < len(low) < report_mod.REVIEW_IMAGES
    gallery = page[page.index('id="gallery"') : page.index('id="distribution"')]
    review = page[page.index('id="review"') : page.index('id="failed"')]
    assert gallery.count("<img ") == 2 * min(len(mistakes), 3 * report_mod.GALLERY_PER_PAIR)
    assert review.count("<img ") == 2 * len(low)
    assert [re.sub(r"^zoom on the cell in ", "", a) for a in re.findall(r'alt="(zoom on the cell in [^"]*)"', review)] == [
        r["path"] for r in low
    ]
    assert page.count("<img ") == 2 + gallery.count("<img ") + review.count("<img ")  # + both confusion matrices
    assert page.count("<details class=zoom><summary><img ") == gallery.count("<img ") + review.count("<img ")


def test_file_names_are_escaped(tmp_path):
    """Autoescaping: a file name with markup in it is shown as text, and its pictures are still found."""
    root = tmp_path / "root"
    (root / "EOSINOPHIL").mkdir(parents=True)
    name = 'a<b>&"x.jpeg'
    shutil.copy(sorted((SAMPLE / "EOSINOPHIL").glob("*.jpeg"))[0], root / "EOSINOPHIL" / name)
    csv_path = tmp_path / "pred.csv"
    with PredictionWriter(csv_path, LABELS) as w:
        w.write(
            [
                Prediction(
                    path=f"EOSINOPHIL/{name}", label="MONOCYTE", confidence=0.4, probabilities=[0.3, 0.2, 0.4, 0.1], true_label="EOSINOPHIL"
                )
            ]
        )
    write_sidecar(csv_path, {"model": {"name": "<i>m</i>", "sha256": "ab" * 32, "labels": list(LABELS)}, "root": str(root)})
    page = write_report(csv_path, tmp_path / "r", on_warning=None)["html"].read_text()
    assert "a<b>" not in page and "<i>m" not in page
    assert "a&lt;b&gt;&amp;&#34;x.jpeg" in page and "&lt;i&gt;m&lt;/i&gt;" in page
    assert page.count("data:image/jpeg") == 4  # gallery and review: zoom and field each


def test_torn_last_line_is_skipped(tmp_path):
    csv_path = _synthetic_csv(tmp_path / "pred.csv", 200)
    with open(csv_path, "a") as f:
        f.write("EOSINOPHIL/_0_1616.jpeg,EOSI")  # an interrupted run's torn last line
    paths = write_report(csv_path, tmp_path / "r", on_warning=None)
    m = json.loads(paths["metrics"].read_text())
    assert m["counts"]["files"] == 200 and m["counts"]["malformed_rows"] == 1
    assert any("malformed" in w for w in m["warnings"])


# --------------------------------------------------------------------------- CLI


def test_cli_report(sample_run, tmp_path):
    csv_path = tmp_path / "p.csv"
    shutil.copy(sample_run, csv_path)
    shutil.copy(str(sample_run) + ".run.json", str(csv_path) + ".run.json")
    res = CliRunner().invoke(main, ["report", str(csv_path), "--review-threshold", "0.9"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "p-report"
    assert (out / "report.html").is_file() and "report.html" in res.output
    assert json.loads((out / "metrics.json").read_text())["review_threshold"] == 0.9
    res = CliRunner().invoke(main, ["report", str(csv_path), "-o", str(tmp_path / "g"), "--group-by", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g" / "differential.csv").is_file()


def test_cli_report_rejects_other_csv(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    res = CliRunner().invoke(main, ["report", str(bad)])
    assert res.exit_code == 2
    assert "not a predictions CSV" in res.output


def test_classify_with_report(tmp_path, color_model):
    res = CliRunner().invoke(
        main,
        [
            "classify",
            str(SAMPLE),
            "-m",
            str(color_model),
            "-o",
            str(tmp_path / "p.csv"),
            "--workers",
            "1",
            "-q",
            "--report",
            str(tmp_path / "rep"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.html").is_file()
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["counts"]["files"] == 40


#: Class names that matplotlib's mathtext cannot parse, and one it would typeset as math: all are drawn as written.
MATH_LABELS = ("$EOS_{$", "$x^$", r"$\frac$", "$5 and $6")


def test_labels_with_dollar_signs_are_drawn_as_written(tmp_path, monkeypatch):
    """A label is text, never mathtext: labels with '$' used to end ``classify --report`` (exit 5) and ``report`` (exit 2)."""
    import matplotlib.figure

    drawn: list[list[tuple[str, bool]]] = []
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, *args, **kwargs):
        ax = fig.axes[0]  # the matrix (the colour bar is the second)
        drawn.extend([(t.get_text(), t.get_parse_math()) for t in ticks] for ticks in (ax.get_xticklabels(), ax.get_yticklabels()))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    model = build_color_model(tmp_path / "m.onnx", labels=MATH_LABELS)
    tree = tmp_path / "in"
    for src, dst in zip(LABELS, MATH_LABELS, strict=True):
        shutil.copytree(SAMPLE / src, tree / dst)
    csv_path, rep = tmp_path / "p.csv", tmp_path / "rep"
    args = ["classify", str(tree), "-m", str(model), "-o", str(csv_path), "--workers", "1", "-q", "--report", str(rep)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["report", str(csv_path), "-o", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    for out in (rep, tmp_path / "again"):
        page = (out / "report.html").read_text()
        assert all(html.escape(lb) in page for lb in MATH_LABELS)
        assert (out / "confusion_matrix.png").is_file() and (out / "confusion_matrix_normalized.png").is_file()
    assert drawn == [[(lb, False) for lb in MATH_LABELS]] * 8  # 2 reports x 2 matrices x 2 axes


# --------------------------------------------------------------------------- a real browser


@needs_chromium()
def test_report_renders_offline_in_chromium(sample_report, tmp_path):
    paths, _ = sample_report
    dom = dump_dom(paths["html"], tmp_path / "profile")
    for sec in ("confusion-matrix", "per-class-table", "gallery", "failed"):
        assert f'id="{sec}"' in dom, sec
    assert dom.count('alt="confusion matrix') == 2
    assert "true EOSINOPHIL → predicted MONOCYTE" in dom
    assert dom.count("data:image/jpeg;base64,") >= 8


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_non_utf8_file_name(tmp_path):
    """A file name that is not UTF-8 (kept as surrogates in the CSV) still gets its thumbnail."""
    root = tmp_path / "root"
    (root / "EOSINOPHIL").mkdir(parents=True)
    src = sorted((SAMPLE / "EOSINOPHIL").glob("*.jpeg"))[0]
    raw = os.fsencode(root / "EOSINOPHIL") + b"/caf\xe9.jpeg"
    shutil.copy(src, raw)
    rel = "EOSINOPHIL/" + os.fsdecode(b"caf\xe9.jpeg")
    csv_path = tmp_path / "pred.csv"
    with PredictionWriter(csv_path, LABELS) as w:
        w.write(
            [
                Prediction(path=rel, label="MONOCYTE", confidence=0.4, probabilities=[0.3, 0.2, 0.4, 0.1], true_label="EOSINOPHIL"),
                Prediction(
                    path="EOSINOPHIL/ok.jpeg",
                    label="EOSINOPHIL",
                    confidence=0.9,
                    probabilities=[0.9, 0.0, 0.1, 0.0],
                    true_label="EOSINOPHIL",
                ),
            ]
        )
    write_sidecar(csv_path, {"model": {"name": "x", "sha256": "ab" * 32, "labels": list(LABELS)}, "root": str(root)})
    paths = write_report(csv_path, tmp_path / "r", group_by=1, on_warning=None)
    page = paths["html"].read_text(encoding="utf-8")
    gallery = page[page.index('id="gallery"') : page.index('id="distribution"')]
    assert gallery.count("data:image/jpeg") == 2  # the zoom and the whole field
    assert "caf\ufffd.jpeg" in page
    with open(paths["review"], encoding="utf-8", errors="surrogateescape", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [rel]
    assert json.loads(paths["metrics"].read_text())["counts"]["ok"] == 2


# --------------------------------------------------------------------------- CSV integrity and formula cells


def test_a_path_twice_is_refused_naming_its_lines(tmp_path):
    csv_path = tmp_path / "pred.csv"
    row = Prediction("EOSINOPHIL/a.jpeg", "EOSINOPHIL", 0.9, [0.9, 0.05, 0.03, 0.02], "EOSINOPHIL")
    other = Prediction("EOSINOPHIL/b.jpeg", status="error", error="empty file")
    with PredictionWriter(csv_path, LABELS) as w:
        w.write([row, other, row, Prediction("=x.jpeg", "MONOCYTE", 0.5, [0.2, 0.2, 0.5, 0.1]), other])
    with open(csv_path, "a", encoding="utf-8") as f:
        f.write("=x.jpeg,MONOCYTE,0.5,0.2,0.2,0.5,0.1,,ok,\n")  # the same file as ./=x.jpeg
    with pytest.raises(report_mod.ReportError) as e:
        write_report(csv_path, tmp_path / "r", on_warning=None)
    assert str(e.value) == (
        f"{csv_path} names a file more than once, so its rows would be counted twice: "
        "'EOSINOPHIL/a.jpeg' on lines 2, 4; 'EOSINOPHIL/b.jpeg' on lines 3, 6; '=x.jpeg' on lines 5, 7; "
        "keep one row per file (wbc-batch classify writes one) and report again"
    )
    res = CliRunner().invoke(main, ["report", str(csv_path), "-o", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "names a file more than once" in res.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()  # a refused CSV leaves no empty report folder behind


def _cells(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_report_csvs_hold_no_cell_that_starts_a_formula(tmp_path, color_model):
    from test_orchestrator import FORMULA_FIRSTS, make_formula_tree

    rels = make_formula_tree(tmp_path / "in")
    pred = classify(tmp_path / "in", color_model, tmp_path / "pred.csv")
    paths = write_report(pred, tmp_path / "r", group_by=1, review_share=1.0, on_warning=None)
    for kind in ("review", "differential", "per_class"):
        starts = [c for row in _cells(paths[kind]) for c in row if c[:1] in FORMULA_FIRSTS]
        assert all(re.fullmatch(r"-\d+\.\d+", c) for c in starts), (kind, starts)  # only numbers such as -0.5
    review = {r["path"]: r for r in read_rows(paths["review"])}
    assert sorted(review) == sorted("'" + p if p[0] in FORMULA_FIRSTS else p for p in rels)
    assert review["'=slide/=cell.jpeg"]["group"] == "'=slide" and review["'-top.jpeg"]["group"] == "."
    groups = [r["group"] for r in read_rows(paths["differential"])]
    assert sorted(groups) == sorted(["'" + c + "slide" for c in FORMULA_FIRSTS] + ["'=HYPERLINK(\"http:\\\\x\",\"open\")", "EOSINOPHIL", "."])
    page = paths["html"].read_text()
    assert "=slide/=cell.jpeg" in page and "&#39;=slide" not in page  # the page shows the names as they are


# --------------------------------------------------------------------------- code shape


def branches(fn) -> int:
    """Cyclomatic complexity counted as radon counts it: 1, plus one per if, conditional expression, loop (and its
    else), except clause, assert and match case, one per comprehension and each of its ifs, and one per extra operand
    of and/or. (mccabe's count leaves and/or out, so it put write_report's three ``group_by or 1`` at nothing.)"""
    import ast

    n = 1
    for node in ast.walk(fn):
        if isinstance(node, (ast.If, ast.IfExp, ast.ExceptHandler, ast.Assert, ast.match_case)):
            n += 1
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            n += 1 + bool(node.orelse)
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
    return n


def test_write_report_stays_simple():
    """write_report reads as the list of its steps: complexity under 10 (it was 24, working out its group level three
    times); every choice lives in a named helper."""
    import ast

    tree = ast.parse(Path(report_mod.__file__).read_text(encoding="utf-8"))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "write_report")
    assert branches(fn) < 10
    assert branches(ast.parse("def f(a, b):\n    if a or b and a:\n        return [x for x in a if x]\n    return 1 if b else 2").body[0]) == 7
