"""wbc_batch.errors: one base exception whose subclasses carry the CLI's exit code; per-file image errors stay out."""

from __future__ import annotations

import pickle

import pytest

from wbc_batch.errors import ExitCode, UsageError, WbcBatchError
from wbc_batch.evaluation.report import ReportError
from wbc_batch.inference.metadata import ModelError
from wbc_batch.inference.orchestrator import NoImagesError
from wbc_batch.inference.predictions import OutputError
from wbc_batch.inference.preprocess import ImageError
from wbc_batch.inference.ray_engine import RayEngineError, RayUnavailable
from wbc_batch.inference.truth import LabelsError


@pytest.mark.parametrize(
    "cls, code",
    [
        (ModelError, 4),
        (OutputError, 5),
        (LabelsError, 2),
        (ReportError, 2),
        (NoImagesError, 3),
        (RayEngineError, 1),
        (RayUnavailable, 1),
        (UsageError, 2),
    ],
)
def test_each_error_carries_its_exit_code(cls, code):
    e = cls("what went wrong")
    assert isinstance(e, WbcBatchError) and e.exit_code == code and str(e) == "what went wrong"
    again = pickle.loads(pickle.dumps(e))  # errors cross process boundaries (Ray actors)
    assert type(again) is cls and again.exit_code == code and str(again) == "what went wrong"


def test_exit_code_can_be_given_per_raise():
    e = WbcBatchError("--address is only meaningful with --engine ray", exit_code=ExitCode.USAGE)
    assert e.exit_code == 2 and WbcBatchError("x").exit_code == 1
    assert ModelError("x").exit_code == 4  # the class default is untouched
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 130]


def test_a_bad_image_is_a_row_not_a_run_failure():
    assert not issubclass(ImageError, WbcBatchError)
