"""A lab's small labelled set: train with the library's defaults on a seeded subset, export, classify a held-out set.

    python bench/bench_small_data.py [--per-class 120 30] [--starts default scratch] [--out runs/small]

For each size N and each start, ``wbc-batch train DATA --max-per-class N --seed S`` (a seeded subset: at most N
images of each class), ``wbc-batch export``, ``wbc-batch classify TEST_DIR`` and the scores of its predictions:
accuracy, macro-F1 and each class's F1. Starts:

- ``default``: every option at the library's default (a pretrained start where the default network has one);
- ``scratch``: the same with ``--pretrained none`` (random weights);
- ``wbc-net``: ``--arch wbc-net``, the small network trained from random weights;
- ``init``: ``--init MODEL`` (``--init-model``, default the shipped model): fine-tuned from a wbc-batch model.

Everything goes through the CLI, as a user's run would; a start that fails is reported, not hidden. Runs already
in ``--out`` (a ``predictions.csv`` there) are scored again, not retrained, so an interrupted bench resumes.
Prints one markdown table and writes ``results.json`` beside the runs. Needs the ``train`` extra; takes minutes
per run on a 2-core machine (the default network at 120 per class: about 8 minutes).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pbc"
STARTS = {"default": [], "scratch": ["--pretrained", "none"], "wbc-net": ["--arch", "wbc-net"]}


def wbc(*args: str) -> None:
    """One wbc-batch command in this interpreter; its output goes to the bench's log, a failure raises."""
    subprocess.run([sys.executable, "-m", "wbc_batch", *args], check=True)


def start_args(start: str, init_model: str) -> list[str]:
    return ["--init", init_model] if start == "init" else STARTS[start]


def run_one(train_dir: Path, test_dir: Path, out: Path, n: int, start: str, a: argparse.Namespace) -> dict:
    """Train, export and classify one (size, start); returns its scores and times."""
    run = out / f"n{n}-{start}"
    pred = run / "predictions.csv"
    times = {}
    if not pred.is_file():
        t0 = time.perf_counter()
        wbc("train", str(train_dir), "--max-per-class", str(n), "--seed", str(a.seed), "-o", str(run), *a.train_args,
            *start_args(start, a.init_model))
        times["train_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        wbc("export", str(run), "-o", str(run / "model.onnx"))
        times["export_s"] = round(time.perf_counter() - t0, 1)
        wbc("classify", str(test_dir), "-m", str(run / "model.onnx"), "-o", str(pred), "--overwrite", "-q")
    return {"per_class_n": n, "start": start, **times, **scores(pred)}


def scores(pred: Path) -> dict:
    """Accuracy, macro-F1 and per-class F1 of a predictions CSV whose truth is its class folders (sklearn's figures)."""
    from sklearn.metrics import accuracy_score, f1_score

    with open(pred, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    t = [Path(r["path"]).parent.name for r in rows]
    p = [r["label"] for r in rows]
    classes = sorted(set(t))
    f1 = f1_score(t, p, labels=classes, average=None, zero_division=0)
    return {"n": len(rows), "accuracy": round(float(accuracy_score(t, p)), 4),
            "macro_f1": round(float(f1.mean()), 4), "f1": {c: round(float(v), 3) for c, v in zip(classes, f1, strict=True)}}


def table(results: list[dict]) -> str:
    classes = sorted({c for r in results if "f1" in r for c in r["f1"]})
    head = "| per class | start | accuracy | macro-F1 | " + " | ".join(c[:4] for c in classes) + " | train s |"
    lines = [head, "|" + "---|" * (5 + len(classes))]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['per_class_n']} | {r['start']} | failed: {r['error']} |")
            continue
        f1 = " | ".join(f"{r['f1'][c]:.3f}" for c in classes)
        lines.append(f"| {r['per_class_n']} | {r['start']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {f1} | {r.get('train_s', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-dir", type=Path, default=DATA / "train")
    ap.add_argument("--test-dir", type=Path, default=DATA / "test")
    ap.add_argument("--per-class", type=int, nargs="+", default=[120, 30])
    ap.add_argument("--starts", nargs="+", default=["default", "wbc-net"], choices=[*STARTS, "init"])
    ap.add_argument("--init-model", default=str(ROOT / "export" / "wbc-default.onnx"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "small")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="passed to every train (after the rest)")
    a = ap.parse_args()
    results = []
    for n in a.per_class:
        for start in a.starts:
            try:
                results.append(run_one(a.train_dir, a.test_dir, a.out, n, start, a))
            except subprocess.CalledProcessError as e:
                results.append({"per_class_n": n, "start": start, "error": f"exit {e.returncode}"})
            print(table(results[-1:]).splitlines()[-1], flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
