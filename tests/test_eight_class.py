"""An 8-class model on a 4-class truth set: everything downstream follows the model's labels.

The shipped default ``export/wbc-default.onnx`` (EfficientNet-Lite0, opset 18, IR 9: it must load on every onnxruntime the
matrix installs, 1.23.2 on Python 3.10 included) classifies sample_data, whose folders hold 4 of its 8 classes: the
CSV carries 8 probability columns, the report's macro averages are over the 4 classes the truth holds, and a call of
another class counts as wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE

from wbc_batch import RunnerOptions
from wbc_batch.evaluation.report import write_report
from wbc_batch.inference.model import load_model
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify

EIGHT = ROOT / "export" / "wbc-default.onnx"
LABELS = ("BASOPHIL", "EOSINOPHIL", "ERYTHROBLAST", "IG", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL", "PLATELET")
pytestmark = pytest.mark.skipif(not EIGHT.is_file(), reason="export/wbc-default.onnx missing")


@pytest.fixture(scope="module")
def eight_class_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    work = tmp_path_factory.mktemp("eight")
    out = work / "pred.csv"
    cfg = ClassifyConfig(inputs=[str(SAMPLE)], output=str(out), model=str(EIGHT), runner=RunnerOptions(workers=1), progress="none")
    assert run_classify(cfg).ok == 40
    with open(out, newline="", encoding="utf-8") as f:
        return out, list(csv.DictReader(f))


def test_the_eight_class_model_loads_and_names_its_labels():
    md = load_model(EIGHT, threads=1).metadata
    assert md.labels == LABELS and md.name == "wbc-default" and md.arch == "efficientnet-lite0"


def test_the_csv_has_one_probability_column_per_model_label(eight_class_run):
    _, rows = eight_class_run
    assert [k for k in rows[0] if k.startswith("prob_")] == [f"prob_{lb}" for lb in LABELS]
    for r in rows:
        probs = [float(r[f"prob_{lb}"]) for lb in LABELS]
        assert abs(sum(probs) - 1) < 1e-4 and r["label"] == LABELS[probs.index(max(probs))]


def test_the_report_averages_over_the_truths_classes_and_counts_other_calls_wrong(eight_class_run, tmp_path):
    csv_path, rows = eight_class_run
    write_report(csv_path, tmp_path / "rep", on_warning=None)
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    truth = {r["true_label"] for r in rows}
    assert truth == {"EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"}
    assert m["labels"] == list(LABELS) and m["macro_over"] == sorted(truth)
    right = sum(r["label"] == r["true_label"] for r in rows)
    assert m["accuracy"] == pytest.approx(right / len(rows))
    f1 = [m["per_class"][c]["f1"] for c in sorted(truth)]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 4)
    sk = pytest.importorskip("sklearn.metrics")
    t, p = [r["true_label"] for r in rows], [r["label"] for r in rows]
    assert m["macro_f1"] == pytest.approx(sk.f1_score(t, p, labels=sorted(truth), average="macro", zero_division=0))
