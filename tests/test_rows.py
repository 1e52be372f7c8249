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
    res = BatchResult(probs, [None, "empty file", None], {"ood_score": np.array([0.5, 9.0], np.float32), "in_domain": np.array([True, False])})
    a, b, c = to_predictions(files, res, LABELS, lambda rel: "")
    assert (a.ood_score, a.in_domain, a.risk) == (0.5, True, pytest.approx(0.4))
    assert (b.ood_score, b.in_domain, b.risk) == (None, None, None)  # an error row has neither
    assert (c.label, c.ood_score, c.in_domain, c.risk) == ("EOSINOPHIL", 9.0, False, pytest.approx(0.3))


def test_rows_of_a_model_without_a_domain_check_have_none():
    p = to_predictions([InputFile("/r/a.jpg", "a.jpg")], BatchResult(np.array([[0.25, 0.25, 0.4, 0.1]], np.float32), [None]), LABELS, lambda r: "")[0]
    assert (p.ood_score, p.in_domain, p.risk) == (None, None, pytest.approx(0.6))


def test_a_worker_value_without_an_attribute_of_its_own_is_in_values():
    files = [InputFile("/r/a.jpg", "a.jpg"), InputFile("/r/b.jpg", "b.jpg")]
    res = BatchResult(np.array([[0.25, 0.25, 0.4, 0.1]], np.float32), ["empty file", None], {"entropy": np.array([1.25], np.float32)})
    bad, good = to_predictions(files, res, LABELS, lambda r: "")
    assert (bad.values, good.values) == ({}, {"entropy": 1.25}) and type(good.values["entropy"]) is float


def test_a_failed_batch_is_an_error_row_per_file():
    files = [InputFile("/r/a.jpg", "a.jpg"), InputFile("/r/b.jpg", "b.jpg")]
    res = BatchResult.failed(["empty file", "crashed"], len(LABELS))
    assert res.probabilities.shape == (0, 4) and res.probabilities.dtype == np.float32 and res.values == {}
    assert [(p.status, p.error, p.label) for p in to_predictions(files, res, LABELS, lambda r: "")] == [("error", "empty file", ""), ("error", "crashed", "")]


def test_the_padded_form_is_one_entry_per_file_and_comes_back_whole():
    probs = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]], np.float32)
    values = {"ood_score": np.array([0.5, 9.0], np.float32), "in_domain": np.array([True, False])}
    res = BatchResult(probs, [None, "empty file", None], values)
    pad = res.padded()
    assert sorted(pad) == ["error", "ok", "probs", "value_in_domain", "value_ood_score"]
    assert pad["ok"].tolist() == [True, False, True] and pad["error"].tolist() == ["", "empty file", ""]
    np.testing.assert_array_equal(pad["probs"], [probs[0], [0, 0, 0, 0], probs[1]])
    assert pad["value_ood_score"].dtype == np.float32 and pad["value_ood_score"].tolist() == [0.5, 0.0, 9.0]
    back = BatchResult.from_padded(pad)
    np.testing.assert_array_equal(back.probabilities, probs)
    assert back.errors == res.errors and back.values.keys() == values.keys()
    for name, v in values.items():
        np.testing.assert_array_equal(back.values[name], v)
        assert back.values[name].dtype == v.dtype
    files = [InputFile(f"/r/{n}", n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert to_predictions(files, back, LABELS, lambda r: "") == to_predictions(files, res, LABELS, lambda r: "")


def test_risk_is_one_minus_confidence():
    assert risk(0.8) == pytest.approx(0.2) and risk(1.0) == 0.0


@pytest.mark.parametrize(("out", "checked", "warns"), [(0, 0, False), (10, 100, False), (11, 100, True), (3, 3, True)])
def test_domain_warning_above_the_default_share(out, checked, warns):
    msg = domain_warning(out, checked)
    assert OUT_OF_DOMAIN_WARN_SHARE == 0.10 and (msg is not None) == warns
    if warns:
        assert msg.startswith(f"{out} of {checked} images ({round(100 * out / checked)}%) are out of domain")
        assert "wbc-batch train DIR --init MODEL" in msg and "then wbc-batch export" in msg and "wbc-batch calibrate" not in msg
