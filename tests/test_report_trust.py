"""wbc_batch.evaluation.report_trust and the report's trust section: review queue, calibration, risk-coverage, domain check."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LABELS, SAMPLE, TRUST_OUT_OF_DOMAIN

from wbc_batch.cli import main
from wbc_batch.evaluation.reliability import coverage_point, expected_calibration_error, share_for_accuracy
from wbc_batch.evaluation.report import write_report
from wbc_batch.evaluation.report_trust import NO_DOMAIN_NOTE, ReviewPolicy
from wbc_batch.inference.predictions import Prediction, PredictionWriter, write_sidecar

N = 60


def _rows(path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _synthetic(tmp_path, domain: bool = True, truth: bool = True, out_every: int = 4):
    """N rows of known confidence and correctness; every ``out_every``-th out of domain; one error row."""
    rng = np.random.default_rng(3)
    conf = np.round(rng.uniform(0.3, 1.0, N), 6)
    ok = rng.uniform(0, 1, N) < conf
    preds = []
    for i in range(N):
        probs = [conf[i], 1 - conf[i], 0.0, 0.0]
        t = ("EOSINOPHIL" if ok[i] else "LYMPHOCYTE") if truth else ""
        p = Prediction(f"s{i % 3}/f{i:02d}.jpg", "EOSINOPHIL", float(conf[i]), probs, t)
        if domain:
            p.ood_score, p.in_domain = float(i), i % out_every != 0
        preds.append(p)
    preds.append(Prediction("s0/broken.jpg", status="error", error="empty file"))
    path = tmp_path / "pred.csv"
    with PredictionWriter(path, LABELS, domain=domain) as w:
        w.write(preds)
    side = {"model": {"name": "m", "sha256": "ab" * 32, "labels": list(LABELS)}, "root": str(tmp_path)}
    if domain:
        side["model"]["trust"] = {"calibration": {"method": "temperature", "temperature": 1.5, "data": {"files": 99},
                                                  "ece_before": 0.08, "ece_after": 0.02}}
    write_sidecar(path, side)
    return path, conf, ok


def test_default_queue_is_the_riskiest_tenth_and_the_figures_match_reliability(tmp_path):
    path, conf, ok = _synthetic(tmp_path)
    warnings = []
    paths = write_report(path, tmp_path / "r", on_warning=warnings.append)
    review = _rows(paths["review"])
    assert list(review[0]) == ["path", "label", "confidence", "risk", "true_label", "group", "ood_score", "in_domain"]
    k = math.ceil(0.1 * N)
    order = np.argsort(-(1 - conf), kind="stable")[:k]
    assert [r["path"] for r in review] == [f"s{i % 3}/f{i:02d}.jpg" for i in order]
    assert [float(r["risk"]) for r in review] == pytest.approx(sorted(1 - conf, reverse=True)[:k], abs=1e-6)
    t = json.loads(paths["metrics"].read_text())["trust"]
    assert t["review"] == {"mode": "share", "asked": 0.1, "files": k, "share": k / N,
                           "caught": coverage_point(1 - conf, ok, k / N).caught,
                           "accepted_accuracy": pytest.approx(coverage_point(1 - conf, ok, k / N).accepted_accuracy)}
    assert t["ece"] == pytest.approx(expected_calibration_error(conf, ok))
    assert t["domain"] == {"checked": N, "out_of_domain": N // 4, "share": 0.25, "warn_share": 0.1}
    assert warnings[-1].startswith(f"{N // 4} of {N} images (25%) are out of domain")
    page = paths["html"].read_text(encoding="utf-8")
    at = coverage_point(1 - conf, ok, k / N)
    assert f"Checking the <b>{100 * k / N:.1f}%</b> riskiest ({k} files) catches <b>{100 * at.caught:.0f}%</b> of the {int((~ok).sum())} errors" in page
    assert f'ECE <b id="ece">{expected_calibration_error(conf, ok):.3f}</b>' in page
    assert 'id="reliability-diagram"' in page and 'id="risk-coverage"' in page and "(calibration error" in page and "temperature 1.500)" in page
    assert f"<b>{N // 4}</b> of {N} classified files" in page and NO_DOMAIN_NOTE not in page
    assert re.search(r'<div class="card bad" id="out-of-domain-card"><div class=v>15</div>', page)  # 25% > 10%: marked


def test_target_accuracy_picks_the_smallest_share_that_reaches_it(tmp_path):
    path, conf, ok = _synthetic(tmp_path)
    paths = write_report(path, tmp_path / "r", target_accuracy=0.9, on_warning=None)
    share = share_for_accuracy(1 - conf, ok, 0.9)
    t = json.loads(paths["metrics"].read_text())["trust"]["review"]
    assert (t["mode"], t["files"]) == ("target_accuracy", round(share * N))
    assert t["accepted_accuracy"] >= 0.9 and len(_rows(paths["review"])) == round(share * N)


def test_threshold_queue_keeps_every_row_below_it_riskiest_first(tmp_path):
    path, conf, _ = _synthetic(tmp_path)
    paths = write_report(path, tmp_path / "r", review_threshold=0.5, on_warning=None)
    got = [float(r["confidence"]) for r in _rows(paths["review"])]
    assert got == pytest.approx(sorted(c for c in conf if c < 0.5), abs=1e-6)


def test_an_older_model_gets_the_note_and_a_queue_by_confidence(tmp_path):
    path, conf, _ = _synthetic(tmp_path, domain=False)
    paths = write_report(path, tmp_path / "r", review_share=0.2, on_warning=None)
    review = _rows(paths["review"])
    assert list(review[0]) == ["path", "label", "confidence", "risk", "true_label", "group"]
    assert [float(r["confidence"]) for r in review] == pytest.approx(sorted(conf)[: math.ceil(0.2 * N)], abs=1e-6)
    t = json.loads(paths["metrics"].read_text())["trust"]
    assert (t["domain"], t["note"], t["risk"]) == (None, NO_DOMAIN_NOTE, "1 - confidence")
    page = paths["html"].read_text(encoding="utf-8")
    assert "This model carries no domain check" in page and "says nothing about calibration" in page and "out-of-domain-card" not in page


def test_without_truth_there_is_a_queue_but_no_calibration_figures(tmp_path):
    path, conf, _ = _synthetic(tmp_path, truth=False, out_every=100)
    warnings = []
    paths = write_report(path, tmp_path / "r", target_accuracy=0.95, on_warning=warnings.append)
    t = json.loads(paths["metrics"].read_text())["trust"]
    assert (t["ece"], t["risk_coverage"], t["review"]["mode"], t["review"]["files"]) == (None, [], "share", 6)
    assert any(w.startswith("--target-accuracy needs true labels") for w in warnings)
    assert not any("out of domain" in w for w in warnings)  # 1 of 60: no warning
    assert "need true labels" in paths["html"].read_text(encoding="utf-8")


def test_one_way_to_choose_the_queue():
    with pytest.raises(ValueError, match="not share and threshold"):
        ReviewPolicy(share=0.1, threshold=0.5)
    with pytest.raises(ValueError, match="target_accuracy must be within"):
        ReviewPolicy(target_accuracy=1.5)


def test_cli_report_review_share_and_contradictions(tmp_path):
    path, _, _ = _synthetic(tmp_path)
    res = CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path / "r"), "--review-share", "0.25"])
    assert res.exit_code == 0, res.output
    assert len(_rows(tmp_path / "r" / "review.csv")) == 15
    res = CliRunner().invoke(main, ["report", str(path), "--review-share", "0.2", "--review-threshold", "0.5"])
    assert res.exit_code == 2 and "not share and threshold" in res.output


def test_classify_report_with_a_domain_check(tmp_path, trust_model):
    out, rdir = tmp_path / "p.csv", tmp_path / "rep"
    args = ["classify", str(SAMPLE), "-m", str(trust_model), "-o", str(out), "--workers", "1", "--report", str(rdir), "--target-accuracy", "0.5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"out of domain {TRUST_OUT_OF_DOMAIN}" in res.output and "warning" not in res.output
    m = json.loads((rdir / "metrics.json").read_text())
    assert m["trust"]["domain"]["out_of_domain"] == TRUST_OUT_OF_DOMAIN and m["trust"]["review"]["mode"] == "target_accuracy"
    assert m["trust"]["calibration"]["method"] == "temperature"
    res = CliRunner().invoke(main, ["classify", str(SAMPLE), "-m", str(trust_model), "-o", str(tmp_path / "q.csv"), "--review-share", "0.1"])
    assert res.exit_code == 2 and "give --report DIR too" in res.output
    res = CliRunner().invoke(main, [*args[:-2], "--review-share", "0.1", "--target-accuracy", "0.9", "--overwrite"])
    assert res.exit_code == 2 and "not share and target_accuracy" in res.output
