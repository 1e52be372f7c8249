"""A reviewer's corrections: reading corrections.csv, the verified differential in metrics.json, differential.csv and the
HTML, and the refusals (exit 2 naming the rows). Every expected figure is recounted here from the two CSVs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, SAMPLE

from wbc_batch.cli import main
from wbc_batch.evaluation.corrections import EXCLUDE, CorrectionsError, Tally, half_l1, read_corrections, read_path_labels
from wbc_batch.evaluation.report import write_report
from wbc_batch.inference.local_engine import RunnerOptions
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify

BROKEN = "s2/MONOCYTE/broken.jpeg"


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("path", "label")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def slides_run(tmp_path_factory, color_model) -> Path:
    """The colour model on two slides, each a copy of sample_data/ (truth from the class folders), plus one corrupt file."""
    d = tmp_path_factory.mktemp("slides")
    for slide in ("s1", "s2"):
        shutil.copytree(SAMPLE, d / "in" / slide, ignore=shutil.ignore_patterns("README*"))
    (d / "in" / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = d / "pred.csv"
    cfg = ClassifyConfig(inputs=[str(d / "in")], output=str(out), model=str(color_model), runner=RunnerOptions(workers=1), progress="none")
    assert run_classify(cfg).ok == 80
    return out


def _choices(pred: Path) -> list[tuple[str, str]]:
    """12 corrections: the true label of 8 files (some the model got right, some wrong), 3 EXCLUDE, 1 another class."""
    ok = [r for r in _rows(pred) if r["status"] == "ok"]
    wrong = [r for r in ok if r["label"] != r["true_label"]]
    right = [r for r in ok if r["label"] == r["true_label"]]
    picked = wrong[:5] + right[:3]
    out = [(r["path"], r["true_label"]) for r in picked]
    out += [(r["path"], EXCLUDE) for r in (wrong[5], right[3], right[4])]
    other = right[5]
    out.append((other["path"], next(lb for lb in LABELS if lb != other["label"])))
    return out


def _recount(pred: Path, corr: dict[str, str], group: str | None = None) -> dict:
    """The verified differential by hand: each classified row's label, the reviewer's where there is one."""
    counts = dict.fromkeys(LABELS, 0)
    reviewed = changed = excluded = right = known = 0
    for r in _rows(pred):
        if r["status"] != "ok" or (group and not r["path"].startswith(group + "/")):
            continue
        label = r["label"]
        if r["path"] in corr:
            reviewed += 1
            if corr[r["path"]] == EXCLUDE:
                excluded += 1
                continue
            changed += corr[r["path"]] != label
            label = corr[r["path"]]
        counts[label] += 1
        known += 1
        right += label == r["true_label"]
    return {"reviewed": reviewed, "changed": changed, "excluded": excluded, "counts": counts, "accuracy": right / known}


def test_read_corrections_spells_labels_as_the_model_and_paths_as_the_csv(tmp_path):
    root = tmp_path / "root"
    f = _write(tmp_path / "c.csv", [("./=odd.jpeg", "neutrophil"), (str(root / "s1" / "a.jpeg"), "Exclude"), ("", ""),
                                    ("s2//b.jpeg", "MONOCYTE")], header=("Path", "LABEL"))
    table = read_corrections(f, LABELS, root)
    assert {p: (r.line, r.label) for p, r in table.items()} == {
        "=odd.jpeg": (2, "NEUTROPHIL"), "s1/a.jpeg": (3, EXCLUDE), "s2/b.jpeg": (5, "MONOCYTE"),
    }


def test_read_corrections_names_every_bad_row(tmp_path):
    f = _write(tmp_path / "c.csv", [("a.jpeg", "BASOPHIL"), ("b.jpeg", "MONOCYTE"), ("b.jpeg", "MONOCYTE"), ("b.jpeg", EXCLUDE)])
    with pytest.raises(CorrectionsError) as e:
        read_corrections(f, LABELS)
    assert e.value.exit_code == 2
    assert "line 2: label 'BASOPHIL' is neither one of the model's labels" in str(e.value)
    assert "line 5: 'b.jpeg' is given twice, as 'MONOCYTE' (line 3) and 'EXCLUDE'" in str(e.value)
    with pytest.raises(CorrectionsError, match=r"line 3: empty path or label; line 4: empty path or label"):
        read_path_labels(_write(tmp_path / "e.csv", [("a.jpeg", "MONOCYTE"), ("", "MONOCYTE"), ("c.jpeg", " ")]))
    with pytest.raises(CorrectionsError, match="needs a header with 'path' and 'label'"):
        read_path_labels(_write(tmp_path / "h.csv", [("a.jpeg", "MONOCYTE")], header=("file", "class")))


def test_tally_and_half_l1():
    t = Tally([5, 3, 2])
    t.apply(0, 1)  # changed
    t.apply(0, 0)  # confirmed
    t.apply(2, -1)  # excluded
    assert (t.counts, t.reviewed, t.changed, t.excluded, t.n) == ([4, 4, 1], 3, 1, 1, 9)
    assert half_l1([1, 1], [1, 1]) == 0.0 and half_l1([2, 0], [0, 5]) == 100.0 and half_l1([3, 1], [1, 1]) == 25.0


def test_verified_differential_overall_and_per_slide(slides_run, tmp_path):
    corr = dict(_choices(slides_run))
    f = _write(tmp_path / "corrections.csv", list(corr.items()))
    paths = write_report(slides_run, tmp_path / "r", corrections=f, on_warning=None)
    v = json.loads(paths["metrics"].read_text())["verified"]
    want = _recount(slides_run, corr)
    assert {k: v[k] for k in ("reviewed", "changed", "excluded", "counts")} == {k: want[k] for k in ("reviewed", "changed", "excluded", "counts")}
    assert (v["reviewed"], v["excluded"], v["n"]) == (12, 3, 77)
    assert v["accuracy"] == pytest.approx(want["accuracy"]) and v["accuracy"] > v["model_accuracy"]
    assert v["corrections"] == str(f) and v["with_truth"] == 77
    assert v["percent"] == {lb: pytest.approx(100 * n / 77, abs=1e-4) for lb, n in want["counts"].items()}
    for row in _rows(paths["differential"]):
        g = _recount(slides_run, corr, row["group"])
        assert [int(row[f"verified_{k}"]) for k in ("reviewed", "changed", "excluded")] == [g["reviewed"], g["changed"], g["excluded"]]
        assert [int(row[f"verified_count_{lb}"]) for lb in LABELS] == list(g["counts"].values())
        assert int(row["verified_n"]) == sum(g["counts"].values())
    page = paths["html"].read_text()
    assert 'id="verified"' in page and f'id="verified-accuracy">{v["accuracy"]:.3f}<' in page
    assert json.dumps(corr, sort_keys=True) in page.replace("\\u0026", "&")  # the page starts from the choices it was given


def test_verified_differential_error_against_the_truth(slides_run, tmp_path):
    corr = {r["path"]: r["true_label"] for r in _rows(slides_run) if r["status"] == "ok"}  # every cell reviewed right
    v = json.loads(write_report(slides_run, tmp_path / "r", corrections=_write(tmp_path / "c.csv", list(corr.items())),
                                on_warning=None)["metrics"].read_text())["verified"]
    assert v["accuracy"] == 1.0 and v["differential_error"]["verified"] == 0.0 and v["differential_error"]["model"] > 0


def test_report_without_corrections_has_no_verified_part(slides_run, tmp_path):
    paths = write_report(slides_run, tmp_path / "r", on_warning=None)
    assert "verified" not in json.loads(paths["metrics"].read_text())
    assert not [c for c in _rows(paths["differential"])[0] if c.startswith("verified")]
    assert 'id="verified"' not in paths["html"].read_text()


def test_cli_corrections_and_refusals(slides_run, tmp_path):
    good = _write(tmp_path / "good.csv", _choices(slides_run)[:2])
    res = CliRunner().invoke(main, ["report", str(slides_run), "--corrections", str(good), "-o", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["verified"]["reviewed"] == 2
    bad = _write(tmp_path / "bad.csv", [("s1/EOSINOPHIL/nowhere.jpeg", "MONOCYTE"), (BROKEN, "MONOCYTE"), *_choices(slides_run)[:1]])
    res = CliRunner().invoke(main, ["report", str(slides_run), "--corrections", str(bad), "-o", str(tmp_path / "no")])
    assert res.exit_code == 2
    assert "2 correction(s) name no classified file" in res.output
    assert "line 2: 's1/EOSINOPHIL/nowhere.jpeg' is not in pred.csv" in res.output
    assert f"line 3: '{BROKEN}' failed to classify (an error row)" in res.output
    assert not (tmp_path / "no").exists()
    label = _write(tmp_path / "label.csv", [(_choices(slides_run)[0][0], "BASOPHIL")])
    res = CliRunner().invoke(main, ["report", str(slides_run), "--corrections", str(label), "-o", str(tmp_path / "no")])
    assert res.exit_code == 2 and "line 2: label 'BASOPHIL'" in res.output and not (tmp_path / "no").exists()
