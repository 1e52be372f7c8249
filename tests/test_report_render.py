"""report_render: number formats and the template shipped as package data."""

from __future__ import annotations

import math
from importlib import resources

from wbc_batch.evaluation.report_render import _printable, fixed, median_bin, thousands


def test_formats():
    assert fixed(0.87856) == "0.879" and fixed(12.345, 1) == "12.3" and fixed(3) == "3.000"
    assert fixed(None) == fixed(math.nan) == fixed("x") == "–"
    assert thousands(1234567) == "1,234,567" and thousands(None) == "–"


def test_median_bin():
    assert median_bin([0] * 20) == "–"
    assert median_bin([1, 0, 0, 3]) == "0.75–1.00"
    assert median_bin([2, 0, 0, 2]) == "0.00–0.25"


def test_surrogates_show_as_replacement_characters():
    assert _printable("caf\udce9.jpeg") == "caf\ufffd.jpeg"
    assert _printable("café") == "café" and _printable(3) == 3


def test_template_and_css_are_package_data():
    t = resources.files("wbc_batch.evaluation") / "templates"
    assert '{% include "report.css" %}' in (t / "report.html.j2").read_text(encoding="utf-8")
    assert ".pics img.z{width:256px" in (t / "report.css").read_text(encoding="utf-8")
