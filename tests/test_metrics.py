"""wbc_batch.evaluation.metrics (pure numpy) cross-checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from wbc_batch.evaluation.metrics import (
    compute_metrics,
    compute_metrics_from_names,
    confusion_matrix,
    metrics_from_confusion,
    normalize_rows,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")

LABELS = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")


def _assert_matches_sklearn(t, p, labels=LABELS):
    """Every figure of compute_metrics equals scikit-learn's (zero_division=0; per class over all model classes,
    macro over the classes the truth holds)."""
    idx = list(range(len(labels)))
    m = compute_metrics(t, p, labels)
    assert m.n == len(t)
    assert m.labels == tuple(labels)
    assert m.accuracy == pytest.approx(sklearn_metrics.accuracy_score(t, p), abs=1e-12)
    cm = sklearn_metrics.confusion_matrix(t, p, labels=idx)
    np.testing.assert_array_equal(np.asarray(m.confusion_matrix), cm)
    np.testing.assert_array_equal(confusion_matrix(t, p, len(labels)), cm)
    pr, rc, f1, sup = sklearn_metrics.precision_recall_fscore_support(t, p, labels=idx, zero_division=0)
    for i, c in enumerate(m.per_class):
        assert c.label == labels[i]
        assert c.precision == pytest.approx(pr[i], abs=1e-12)
        assert c.recall == pytest.approx(rc[i], abs=1e-12)
        assert c.f1 == pytest.approx(f1[i], abs=1e-12)
        assert c.support == sup[i]
    present = sorted(set(np.asarray(t).tolist())) or idx
    assert m.macro_over == tuple(labels[i] for i in present)
    for avg in ("macro", "weighted"):
        over = present if avg == "macro" else idx
        ap, ar, af, _ = sklearn_metrics.precision_recall_fscore_support(t, p, labels=over, zero_division=0, average=avg)
        assert getattr(m, f"{avg}_precision") == pytest.approx(ap, abs=1e-12), avg
        assert getattr(m, f"{avg}_recall") == pytest.approx(ar, abs=1e-12), avg
        assert getattr(m, f"{avg}_f1") == pytest.approx(af, abs=1e-12), avg
    # The same figures via label names and via the confusion matrix.
    by_name = compute_metrics_from_names([labels[i] for i in t], [labels[i] for i in p], labels)
    assert by_name == m
    assert metrics_from_confusion(cm, labels) == m
    return m


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_random_labels_match_sklearn(seed, n):
    rng = np.random.default_rng(seed * 1000 + n)
    t = rng.integers(0, 4, size=n)
    # Mostly right, some confusions: realistic-looking, not uniform noise.
    p = np.where(rng.random(n) < 0.7, t, rng.integers(0, 4, size=n))
    _assert_matches_sklearn(t, p)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [2, 3, 9])
def test_random_labels_other_class_counts(seed, k):
    labels = tuple(f"C{i}" for i in range(k))
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    t = rng.integers(0, k, size=n)
    p = rng.integers(0, k, size=n)
    _assert_matches_sklearn(t, p, labels)


def test_skewed_weights_differ_from_macro():
    rng = np.random.default_rng(3)
    t = rng.choice(4, size=400, p=[0.7, 0.2, 0.07, 0.03])
    p = np.where(rng.random(400) < 0.8, t, rng.integers(0, 4, size=400))
    m = _assert_matches_sklearn(t, p)
    assert m.weighted_f1 != pytest.approx(m.macro_f1)


def test_class_with_no_samples():
    # MONOCYTE (2) never occurs, neither as truth nor as prediction.
    t = [0, 0, 1, 3, 3, 1]
    p = [0, 1, 1, 3, 0, 1]
    m = _assert_matches_sklearn(t, p)
    mono = m.per_class[2]
    assert (mono.precision, mono.recall, mono.f1, mono.support) == (0.0, 0.0, 0.0, 0)
    # The macro average is over the three classes the truth holds.
    assert m.macro_over == ("EOSINOPHIL", "LYMPHOCYTE", "NEUTROPHIL")
    assert m.macro_f1 == pytest.approx(sum(c.f1 for c in m.per_class) / 3)


def test_class_predicted_but_never_true():
    t = [0, 0, 1, 1]
    p = [0, 2, 1, 2]  # MONOCYTE predicted, never true: precision 0, support 0
    m = _assert_matches_sklearn(t, p)
    assert m.per_class[2].support == 0
    assert m.per_class[2].precision == 0.0


def test_a_wider_model_on_a_narrower_truth_set_counts_other_classes_as_wrong():
    # An 8-class model scored on 4-class truth: a BASOPHIL call for a monocyte is a miss of MONOCYTE;
    # the macro average is over the truth's 4 classes, so it compares with a 4-class model's.
    labels = ("BASOPHIL", "EOSINOPHIL", "ERYTHROBLAST", "IG", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL", "PLATELET")
    t = [1, 1, 4, 4, 5, 5, 6, 6]
    p = [1, 1, 4, 4, 5, 0, 6, 3]
    m = _assert_matches_sklearn(t, p, labels)
    assert m.accuracy == 0.75
    assert m.macro_over == ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
    assert m.macro_recall == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert m.macro_f1 == pytest.approx((1 + 1 + 2 / 3 + 2 / 3) / 4)


def test_class_true_but_never_predicted():
    t = [0, 0, 3, 3]
    p = [0, 0, 0, 0]
    m = _assert_matches_sklearn(t, p)
    assert m.per_class[3].recall == 0.0 and m.per_class[3].precision == 0.0


def test_one_class_only():
    t = [1] * 12
    p = [1] * 12
    m = _assert_matches_sklearn(t, p)
    assert m.accuracy == 1.0
    assert m.per_class[1].f1 == 1.0
    assert m.weighted_f1 == 1.0
    assert m.macro_f1 == 1.0  # averaged over the one class the truth holds


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_one_label_model():
    m = _assert_matches_sklearn([0, 0, 0], [0, 0, 0], ("ONLY",))
    assert m.accuracy == 1.0 and m.confusion_matrix == ((3,),)


def test_all_wrong():
    t = [0, 1, 2, 3, 0, 1, 2, 3]
    p = [1, 2, 3, 0, 3, 0, 1, 2]
    m = _assert_matches_sklearn(t, p)
    assert m.accuracy == 0.0
    assert m.macro_f1 == 0.0 and m.weighted_f1 == 0.0
    assert np.trace(np.asarray(m.confusion_matrix)) == 0


def test_all_right():
    t = list(range(4)) * 5
    m = _assert_matches_sklearn(t, t)
    assert m.accuracy == 1.0 and m.macro_f1 == 1.0 and m.weighted_f1 == 1.0


def test_empty_input_gives_zeros_not_errors():
    # scikit-learn refuses empty input (or warns, by version); ours reports an all-zero result (a run with no truth).
    m = compute_metrics([], [], LABELS)
    assert m.n == 0
    assert m.accuracy == 0.0
    assert m.macro_f1 == 0.0 and m.weighted_f1 == 0.0
    assert m.confusion_matrix == ((0,) * 4,) * 4
    assert all(c.support == 0 and c.f1 == 0.0 for c in m.per_class)
    d = m.to_dict()
    assert d["confusion_matrix_normalized"] == [[0.0] * 4] * 4


def test_normalize_rows_and_to_dict():
    rng = np.random.default_rng(11)
    t = rng.integers(0, 3, size=200)  # NEUTROPHIL row empty
    p = rng.integers(0, 4, size=200)
    m = _assert_matches_sklearn(t, p)
    cm = np.asarray(m.confusion_matrix)
    nm = normalize_rows(cm)
    np.testing.assert_allclose(nm, sklearn_metrics.confusion_matrix(t, p, labels=[0, 1, 2, 3], normalize="true"), atol=1e-12)
    np.testing.assert_allclose(nm[:3].sum(axis=1), 1.0)
    assert (nm[3] == 0).all()
    d = m.to_dict()
    assert d["labels"] == list(LABELS)
    assert set(d["per_class"]) == set(LABELS)
    assert d["per_class"]["EOSINOPHIL"]["support"] == int((t == 0).sum())
    assert d["confusion_matrix"] == cm.tolist()
    np.testing.assert_allclose(d["confusion_matrix_normalized"], nm, atol=1e-6)


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        compute_metrics([0, 1], [0], LABELS)
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 4], [0, 1], LABELS)
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 1], [-1, 1], LABELS)
    with pytest.raises(ValueError, match="not one of the model's labels"):
        compute_metrics_from_names(["EOSINOPHIL"], ["BASOPHIL"], LABELS)
