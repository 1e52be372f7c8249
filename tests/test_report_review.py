"""The review on the report page, in a real browser: reclassify cells by click and by key, reload, save corrections.csv,
then ``wbc-batch report --corrections`` counts what was chosen.

Drives the system's headless chromium through Playwright (no browser is downloaded). Skipped where either is absent.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CHROMIUM, LABELS, SAMPLE, needs_chromium

from wbc_batch.cli import main
from wbc_batch.evaluation.report import write_report
from wbc_batch.inference.local_engine import RunnerOptions
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright (the test extra)")
pytestmark = needs_chromium()


@pytest.fixture(scope="module")
def review_report(tmp_path_factory, color_model) -> tuple[Path, Path]:
    """The colour model on sample_data/ (truth from the class folders), its report with the 25% riskiest in review."""
    d = tmp_path_factory.mktemp("review")
    shutil.copytree(SAMPLE, d / "in", ignore=shutil.ignore_patterns("README*"))
    pred = d / "pred.csv"
    cfg = ClassifyConfig(inputs=[str(d / "in")], output=str(pred), model=str(color_model), runner=RunnerOptions(workers=1), progress="none")
    assert run_classify(cfg).ok == 40
    return pred, write_report(pred, d / "report", review_share=0.25, on_warning=None)["html"]


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
        yield context.new_page()
        browser.close()


def _choice(row) -> str | None:
    pressed = row.locator('.choice button[aria-pressed="true"]')
    return pressed.get_attribute("data-label") if pressed.count() else None


def test_reclassify_by_click_and_key_reload_save_and_count(review_report, page, tmp_path):
    pred, html = review_report
    page.goto(html.resolve().as_uri())
    rows = page.locator("#review-table tr.rv")
    assert rows.count() == 10  # 25% of 40
    assert page.locator("#review-tools").is_visible()
    paths = [rows.nth(i).get_attribute("data-path") for i in range(5)]
    preds = [rows.nth(i).get_attribute("data-pred") for i in range(5)]
    other = next(lb for lb in LABELS if lb != preds[0])
    rows.nth(0).locator(f'.choice button[data-label="{other}"]').click()  # by click
    rows.nth(1).focus()
    page.keyboard.press("2")  # LYMPHOCYTE, and the focus moves on
    assert page.evaluate("document.activeElement.dataset.path") == paths[2]
    page.keyboard.press("0")  # not a cell / cannot tell
    page.keyboard.press("Enter")  # row 4: agree with the model
    page.keyboard.press("ArrowDown")
    page.keyboard.press("3")  # row 6 (index 5): MONOCYTE
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Backspace")  # row 5 (index 4) was never chosen: clearing it changes nothing
    page.keyboard.press(" ")  # enlarges the focused cell's window, Space again closes it
    assert rows.nth(4).locator("details.zoom").first.get_attribute("open") is not None
    page.keyboard.press(" ")
    assert rows.nth(4).locator("details.zoom").first.get_attribute("open") is None
    page.keyboard.press("Tab")  # Tab goes from cell to cell, past the pictures and the buttons
    assert page.evaluate("document.activeElement.dataset.path") == rows.nth(5).get_attribute("data-path")
    cell = page.locator("#gallery figure.rv").first
    cell.locator('.choice button[data-label="EXCLUDE"]').click()  # a gallery cell by click
    chosen = {paths[0]: other, paths[1]: LABELS[1], paths[2]: "EXCLUDE", paths[3]: preds[3],
              rows.nth(5).get_attribute("data-path"): LABELS[2], cell.get_attribute("data-path"): "EXCLUDE"}

    page.reload()  # the choices are kept in the browser
    rows = page.locator("#review-table tr.rv")
    assert [_choice(rows.nth(i)) for i in range(6)] == [other, LABELS[1], "EXCLUDE", preds[3], None, LABELS[2]]
    assert _choice(page.locator("#gallery figure.rv").first) == "EXCLUDE"
    tally = page.locator("#review-tally").inner_text()
    assert tally.startswith(f"{len(chosen)} reviewed")

    with page.expect_download() as dl:
        page.locator("#save-corrections").click()
    assert dl.value.suggested_filename == "corrections.csv"
    saved = tmp_path / "corrections.csv"
    dl.value.save_as(saved)
    with open(saved, encoding="utf-8", newline="") as f:
        assert {r["path"]: r["label"] for r in csv.DictReader(f)} == chosen

    res = CliRunner().invoke(main, ["report", str(pred), "--corrections", str(saved), "-o", str(tmp_path / "verified")])
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "verified" / "metrics.json").read_text())["verified"]
    with open(pred, encoding="utf-8", newline="") as f:
        ok = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    want = dict.fromkeys(LABELS, 0)
    for r in ok:
        label = chosen.get(r["path"], r["label"])
        if label != "EXCLUDE":
            want[label] += 1
    changed = sum(lb not in ("EXCLUDE", r["label"]) for r in ok if (lb := chosen.get(r["path"])))
    assert (v["reviewed"], v["excluded"], v["changed"], v["counts"]) == (len(chosen), 2, changed, want)


def test_the_page_starts_from_the_corrections_it_was_given(review_report, page, tmp_path):
    pred, html = review_report
    with open(html.parent / "review.csv", encoding="utf-8", newline="") as f:
        first = next(csv.DictReader(f))
    corr = tmp_path / "corrections.csv"
    corr.write_text(f"path,label\n{first['path']},EXCLUDE\n", encoding="utf-8")
    out = write_report(pred, tmp_path / "r", review_share=0.25, corrections=corr, on_warning=None)["html"]
    page.goto(out.resolve().as_uri())
    assert _choice(page.locator("#review-table tr.rv").first) == "EXCLUDE"
    assert page.locator("#verified-table").is_visible()
