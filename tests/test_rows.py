"""wbc_batch.inference.rows: an executed batch becomes one row per file, with the truth function it is given."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LABELS

from wbc_batch.inference.discover import InputFile
from wbc_batch.inference.rows import OUT_OF_DOMAIN_WARN_SHARE, BatchResult, Prediction, domain_warning, risk, to_predictions


def test_to_predictions():
    files = [InputFile("/r/EOSINOPHIL/a.jpg", "EOSINOPHIL/a.jpg"), InputFile("/r/b.jpg", "b.jpg")]
    probs = np.array([[0.1, 0.2, 0.6, 0.1]], np.float32)
    res = BatchResult(probs, [None, "empty file"])
    got = to_predictions(files, res, LABELS, lambda rel: rel.upper()[:3])
    assert got[0] == Prediction("EOSINOPHIL/a.jpg", "MONOCYTE", pytest.approx(0.6), pytest.approx([0.1, 0.2, 0.6, 0.1]), "EOS", "ok", "")
    assert got[1] == Prediction("b.jpg", "", None, None, "B.J", "error", "empty file")



def test_to_predictions_carries_the_domain_check_and_risk():
    files = [InputFile("/r/a.jpg", "a.jpg"), InputFile("/r/b.jpg", "b.jpg"), InputFile("/r/c.jpg", "c.jpg")]
    probs = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]], np.float32)
    res = BatchResult(probs, [None, "empty file", None], np.array([0.5, 9.0], np.float32), np.array([True, False]))
    a, b, c = to_predictions(files, res, LABELS, lambda rel: "")
    assert (a.ood_score, a.in_domain, a.risk) == (0.5, True, pytest.approx(0.4))
    assert (b.ood_score, b.in_domain, b.risk) == (None, None, None)  # an error row has neither
    assert (c.label, c.ood_score, c.in_domain, c.risk) == ("EOSINOPHIL", 9.0, False, pytest.approx(0.3))


def test_rows_of_a_model_without_a_domain_check_have_none():
    p = to_predictions([InputFile("/r/a.jpg", "a.jpg")], BatchResult(np.array([[0.25, 0.25, 0.4, 0.1]], np.float32), [None]), LABELS, lambda r: "")[0]
    assert (p.ood_score, p.in_domain, p.risk) == (None, None, pytest.approx(0.6))


def test_risk_is_one_minus_confidence():
    assert risk(0.8) == pytest.approx(0.2) and risk(1.0) == 0.0


@pytest.mark.parametrize(("out", "checked", "warns"), [(0, 0, False), (10, 100, False), (11, 100, True), (3, 3, True)])
def test_domain_warning_above_the_default_share(out, checked, warns):
    msg = domain_warning(out, checked)
    assert OUT_OF_DOMAIN_WARN_SHARE == 0.10 and (msg is not None) == warns
    if warns:
        assert msg.startswith(f"{out} of {checked} images ({round(100 * out / checked)}%) are out of domain")
        assert "wbc-batch train DIR --init MODEL" in msg and "then wbc-batch export" in msg and "wbc-batch calibrate" not in msg
