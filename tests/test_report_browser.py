"""The report in a real browser: headless chromium loads it offline and the pictures are in its DOM.

Skipped where /usr/bin/chromium is absent (on Debian: apt-get install -y chromium).
"""

from __future__ import annotations

import csv
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, SHARED_DATA, dump_dom, needs_chromium, needs_shared_data

from wbc_batch.evaluation.report import GALLERY_MAX, GALLERY_PER_PAIR, REVIEW_IMAGES, write_report
from wbc_batch.inference.local_engine import RunnerOptions
from wbc_batch.inference.model import default_model_path
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify

THRESHOLD = 0.86
pytestmark = needs_chromium()


def _report(inputs: Path, model: Path, work: Path) -> tuple[Path, list[dict]]:
    csv_path = work / "pred.csv"
    cfg = ClassifyConfig(inputs=[str(inputs)], output=str(csv_path), model=str(model), runner=RunnerOptions(workers=1), progress="none")
    assert run_classify(cfg).ok == 40
    paths = write_report(csv_path, work / "report", review_threshold=THRESHOLD, on_warning=None)
    with open(csv_path, encoding="utf-8", newline="") as f:
        return paths["html"], list(csv.DictReader(f))


def _imgs(dom: str, start: str, end: str | None) -> int:
    """<img> elements in the DOM between the section ``start`` and the next section ``end``."""
    part = dom[dom.index(f'id="{start}"') : dom.index(f'id="{end}"') if end else None]
    return len(re.findall(r"<img\b", part))


def _low(rows: list[dict]) -> int:
    return sum(r["status"] == "ok" and float(r["confidence"]) < THRESHOLD for r in rows)


def test_labelled_report_pictures_in_chromium(color_model, tmp_path):
    html, rows = _report(SAMPLE, color_model, tmp_path)
    dom = dump_dom(html, tmp_path / "profile")
    mistakes = sum(r["status"] == "ok" and r["label"] != r["true_label"] for r in rows)
    low = _low(rows)
    assert 0 < low <= REVIEW_IMAGES and mistakes > 0
    assert _imgs(dom, "confusion-matrix", "top-confusions") == 2
    assert _imgs(dom, "gallery", "distribution") == 2 * min(mistakes, 3 * GALLERY_PER_PAIR)  # 3 wrong pairs
    assert _imgs(dom, "review", "failed") == 2 * low  # the zoom and the whole field of each
    assert len(re.findall(r"<img\b", dom)) == 2 + 2 * min(mistakes, 3 * GALLERY_PER_PAIR) + 2 * low
    assert len(re.findall(r'<td class="num true">', dom)) == 0  # class folders only: no per-slide table


def test_unlabelled_report_pictures_in_chromium(color_model, tmp_path):
    flat = tmp_path / "unsorted"
    flat.mkdir()
    for p in sorted(SAMPLE.rglob("*.jpeg")):
        shutil.copy(p, flat / f"{p.parent.name[:3].lower()}_{p.name}")
    html, rows = _report(flat, color_model, tmp_path)
    assert not any(r["true_label"] for r in rows)
    dom = dump_dom(html, tmp_path / "profile")
    low = _low(rows)
    assert 0 < low <= REVIEW_IMAGES
    assert 'id="gallery"' not in dom and 'id="confusion-matrix"' not in dom
    assert _imgs(dom, "review", "failed") == 2 * low
    assert len(re.findall(r"<img\b", dom)) == 2 * low


@pytest.mark.slow
@needs_shared_data()
@pytest.mark.skipif(not default_model_path().is_file(), reason="shipped model export/wbc-default.onnx missing")
def test_test_set_report_is_small_and_renders_fast(tmp_path):
    """The shipped model on the 2,487-image TEST set: report.html under 15 MB, in chromium's DOM in under 5 s."""
    csv_path = tmp_path / "pred.csv"
    cfg = ClassifyConfig(inputs=[str(SHARED_DATA / "TEST")], output=str(csv_path), model=str(default_model_path()), progress="none")
    assert run_classify(cfg).ok == 2487
    html = write_report(csv_path, tmp_path / "report", on_warning=None)["html"]
    assert html.stat().st_size < 15 * 2**20
    t0 = time.perf_counter()
    dom = dump_dom(html, tmp_path / "profile")
    assert time.perf_counter() - t0 < 5.0
    with open(html.parent / "review.csv", encoding="utf-8", newline="") as f:
        queued = len(list(csv.DictReader(f)))
    assert queued == 249  # the default review queue: the 10% riskiest of 2,487, rounded up
    cells = html.read_text(encoding="utf-8").count('<figure class="cell rv"')
    assert 0 < cells <= GALLERY_MAX
    assert len(re.findall(r"<img\b", dom)) == 2 + 2 * cells + 2 * min(queued, REVIEW_IMAGES)
