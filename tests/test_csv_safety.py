"""wbc_batch.csv_safety: the one rule that keeps a CSV cell from starting a spreadsheet formula."""

from __future__ import annotations

import pytest

from wbc_batch.csv_safety import FORMULA_STARTS, plain_path, safe_cell, safe_path, safe_row, starts_formula


@pytest.mark.parametrize("first", FORMULA_STARTS)
def test_text_that_would_start_a_formula_gets_an_apostrophe(first):
    text = first + 'HYPERLINK("http://x","open")'
    assert safe_cell(text) == "'" + text
    assert safe_cell("'" + text) == "'" + text  # an apostrophe already first: nothing to do


@pytest.mark.parametrize("number", ["-0.5", "+1", "-1e-05", "-.25", "+3.", "-7E+2", "0.123456", "12"])
def test_plain_numbers_stay_numbers(number):
    assert safe_cell(number) == number


@pytest.mark.parametrize("text", ["-", "-inf", "-nan", "-1+2", "- 1", "-0.5 ", "+A1", "@SUM(A1)", "-1,5"])
def test_signed_text_that_is_not_a_plain_number_is_neutralised(text):
    assert safe_cell(text) == "'" + text


def test_other_cells_and_non_text_values_are_unchanged():
    assert safe_row(["EOSINOPHIL", "a=b", " =x", 3, -0.5, 0.25, "", None]) == ["EOSINOPHIL", "a=b", " =x", 3, -0.5, 0.25, "", None]
    assert safe_cell(float("-inf")) == "'-inf"  # written as text "-inf", which a spreadsheet would run


@pytest.mark.parametrize("first", FORMULA_STARTS)
def test_paths_get_dot_slash_and_read_back(first):
    for rel in (first + "x.jpeg", first + "slide/cell.jpeg"):
        cell = safe_path(rel)
        assert cell == "./" + rel and not starts_formula(cell)
        assert plain_path(cell) == rel
    assert safe_path("slide/" + first + "x.jpeg") == "slide/" + first + "x.jpeg"  # only the first character matters


def test_plain_path_leaves_other_paths_alone():
    assert [plain_path(p) for p in ("a/b.jpeg", "./a.jpeg", ".hidden/x.jpeg", "../x.jpeg")] == ["a/b.jpeg", "a.jpeg", ".hidden/x.jpeg", "../x.jpeg"]
