"""report.html from a :class:`ReportData`: the Jinja2 template and CSS shipped beside this module.

The page is HTML in ``templates/report.html.j2`` (autoescaped) with ``templates/report.css``
inlined, so it can be read and changed as HTML and still opens offline as one file. This
module only adds what a template should not compute: the number formats, the row-normalised
confusion matrix, and the median histogram bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from ..errors import INSTALL
from ..inference.predictions import ENCODING_ERRORS
from .metrics import normalize_rows
from .report_data import ReportData

MATPLOTLIB_HINT = f"matplotlib is not installed, so the report has no figures: {INSTALL['matplotlib']}"


def _printable(value: object) -> object:
    """Text with surrogates (a non-UTF-8 file name, kept so in the CSV) shows U+FFFD for those bytes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", ENCODING_ERRORS).decode("utf-8", "replace")
    return value


def fixed(x: object, nd: int = 3) -> str:
    """``x`` with ``nd`` decimals; '–' for a missing value."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def thousands(x: int | None) -> str:
    return "–" if x is None else f"{x:,}"


def median_bin(hist: Sequence[int]) -> str:
    total = sum(hist)
    acc = 0
    for b, v in enumerate(hist):
        acc += v
        if total and acc * 2 >= total:
            return f"{b / len(hist):.2f}–{(b + 1) / len(hist):.2f}"
    return "–"


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("wbc_batch.evaluation", "templates"),
        autoescape=True,
        finalize=_printable,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
    )
    env.filters.update(f3=fixed, n=thousands, g=lambda x: f"{x:g}")
    return env


def _nav(d: ReportData) -> list[tuple[str, str]]:
    nav = [("summary", "Summary"), ("trust", "Trust"), ("per-class", "Per class")]
    if d.verified:
        nav.append(("verified", "Verified"))
    if d.has_truth:
        nav += [("confusion-matrix", "Confusion matrix"), ("top-confusions", "Top confusions"), ("gallery", "Misclassified")]
    nav.append(("distribution", "Confidence"))
    if d.groups is not None:
        nav.append(("differential", "Differential"))
    nav += [("review", "Review"), ("failed", "Failed files")]
    if d.curves:
        nav.append(("training-curves", "Training"))
    return nav


def render_html(d: ReportData) -> str:
    """The whole page as one string (images and CSS inlined)."""
    cm_norm = normalize_rows(np.asarray(d.confusion, dtype=np.int64)).tolist()
    return (
        _environment()
        .get_template("report.html.j2")
        .render(d=d, nav=_nav(d), cm_norm=cm_norm, median_bin=median_bin(d.hist), matplotlib_hint=MATPLOTLIB_HINT)
    )
