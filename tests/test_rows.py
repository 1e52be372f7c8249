"""wbc_batch.inference.rows: an executed batch becomes one row per file, with the truth function it is given."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LABELS

from wbc_batch.inference.discover import InputFile
from wbc_batch.inference.rows import BatchResult, Prediction, to_predictions


def test_to_predictions():
    files = [InputFile("/r/EOSINOPHIL/a.jpg", "EOSINOPHIL/a.jpg"), InputFile("/r/b.jpg", "b.jpg")]
    probs = np.array([[0.1, 0.2, 0.6, 0.1]], np.float32)
    res = BatchResult(probs, [None, "empty file"])
    got = to_predictions(files, res, LABELS, lambda rel: rel.upper()[:3])
    assert got[0] == Prediction("EOSINOPHIL/a.jpg", "MONOCYTE", pytest.approx(0.6), pytest.approx([0.1, 0.2, 0.6, 0.1]), "EOS", "ok", "")
    assert got[1] == Prediction("b.jpg", "", None, None, "B.J", "error", "empty file")

