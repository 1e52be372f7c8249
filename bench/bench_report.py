"""Time and memory of ``wbc-batch report`` on a large predictions CSV.

Builds a synthetic predictions CSV (default 100,000 rows) whose paths point at real
sample images: an input root of slide folders (slide_000/, slide_001/, ...) each holding
class folders of symlinks to sample_data/ images, so the pictures of the gallery and the
review list (a zoom on the cell and the whole field) are real reads. Labels and
probabilities look like a real run: per-slide differentials close to blood (neutrophils most, eosinophils fewest), ~85% accuracy with the usual confusions,
softmax probabilities with a spread of confidences, and ~0.5% unreadable files.

The report then runs in a fresh interpreter (``python -m wbc_batch report``), and its wall
time and peak RSS (the child's own, from os.wait4) are printed, with the peak RSS of an
interpreter that only imports the report code and matplotlib, for scale. ``--compare CHECKOUT``
also runs another checkout's report code (its ``wbc_batch``) on the same CSV, the two
alternating for ``--rounds`` rounds, so a change is measured against what it changed on the
same cores at the same time.

    PYTHONPATH=. .venv/bin/python bench/bench_report.py [--rows 100000] [--keep DIR] [--compare CHECKOUT --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
LABELS = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
PRIOR = np.array([0.03, 0.30, 0.06, 0.61])
# Row: true class; columns: where its mistakes go.
CONFUSE = np.array(
    [
        [0.0, 0.10, 0.15, 0.75],
        [0.05, 0.0, 0.75, 0.20],
        [0.05, 0.70, 0.0, 0.25],
        [0.60, 0.15, 0.25, 0.0],
    ]
)
ERRORS = ["cannot identify image file", "image file is truncated (12 bytes not processed)", "empty file"]


def build(work: Path, rows: int, slides: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    samples = {lb: sorted((SAMPLE / lb).glob("*.jpeg")) for lb in LABELS}
    root = work / "slides"
    per_slide = np.full(slides, rows // slides)
    per_slide[: rows % slides] += 1
    true, slide = [], []
    for s, n in enumerate(per_slide):
        prior = rng.dirichlet(PRIOR * 60)  # each slide its own differential, around the prior
        true.append(rng.choice(4, size=n, p=prior))
        slide.append(np.full(n, s))
    t = np.concatenate(true)
    sl = np.concatenate(slide)
    wrong = rng.random(rows) < 0.10
    p = t.copy()
    for c in range(4):
        idx = np.flatnonzero(wrong & (t == c))
        p[idx] = rng.choice(4, size=idx.size, p=CONFUSE[c])
    logits = rng.normal(0, 1.0, size=(rows, 4))
    logits[np.arange(rows), p] += 1.0 + rng.gamma(2.0, 1.5, size=rows)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob = z / z.sum(axis=1, keepdims=True)
    p = prob.argmax(axis=1)
    conf = prob.max(axis=1)
    err = rng.random(rows) < 0.005

    csv_path = work / "predictions.csv"
    dirs = set()
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        f.write("path,label,confidence," + ",".join(f"prob_{lb}" for lb in LABELS) + ",true_label,status,error\n")
        lines = []
        for i in range(rows):
            lb = LABELS[t[i]]
            src = samples[lb][i % len(samples[lb])]
            rel = f"slide_{sl[i]:03d}/{lb}/{src.stem}_r{i:06d}.jpeg"
            d = root / f"slide_{sl[i]:03d}" / lb
            if d not in dirs:
                d.mkdir(parents=True, exist_ok=True)
                dirs.add(d)
            os.symlink(src, root / rel)
            if err[i]:
                lines.append(f"{rel},,,,,,,{lb},error,{ERRORS[i % len(ERRORS)]}\n")
            else:
                pr = ",".join(f"{v:.6f}" for v in prob[i])
                lines.append(f"{rel},{LABELS[p[i]]},{conf[i]:.6f},{pr},{lb},ok,\n")
            if len(lines) >= 5000:
                f.writelines(lines)
                lines.clear()
        f.writelines(lines)
    side = {
        "wbc_batch": "bench",
        "model": {"name": "bench-synthetic", "path": "(none)", "sha256": "0" * 64, "labels": list(LABELS), "arch": "synthetic"},
        "root": str(root),
        "inputs": [str(root)],
        "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:10:00+00:00",
        "state": "finished",
        "options": {"workers": 2, "batch_size": 32, "provider": "cpu", "threads": 0},
        "summary": {
            "files": rows,
            "ok": int(rows - err.sum()),
            "errors": int(err.sum()),
            "processed": rows,
            "wall_s": 600.0,
            "images_per_s": rows / 600.0,
        },
    }
    Path(str(csv_path) + ".run.json").write_text(json.dumps(side, indent=2), encoding="utf-8")
    return csv_path


def _child_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process, its own (not the maximum over every child so far)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def compare(csv_path: Path, work: Path, checkouts: list[Path], rounds: int, threshold: float) -> None:
    """The report of each checkout's code on the same CSV, alternating, ``rounds`` times; the median time and peak RSS of each."""
    times: dict[Path, list[tuple[float, float]]] = {c: [] for c in checkouts}
    for r in range(rounds):
        for c in checkouts:
            out = work / f"report-{r}-{checkouts.index(c)}"
            cmd = [sys.executable, "-m", "wbc_batch", "report", str(csv_path), "-o", str(out), "--review-threshold", str(threshold)]
            times[c].append(_timed(cmd, dict(os.environ, PYTHONPATH=str(c))))
            shutil.rmtree(out, ignore_errors=True)
    first = float(np.median([t for t, _ in times[checkouts[0]]]))
    for c in checkouts:
        wall = [t for t, _ in times[c]]
        rss = max(m for _, m in times[c])
        print(f"{c}: report time median {np.median(wall):.2f} s of {', '.join(f'{t:.2f}' for t in wall)} "
              f"({np.median(wall) / first:.3f} x the first); peak RSS {rss:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--slides", type=int, default=50)
    ap.add_argument("--keep", type=Path, default=None, help="build here and keep it (default: a temp dir, removed)")
    ap.add_argument("--review-threshold", type=float, default=0.5)
    ap.add_argument("--compare", type=Path, default=None, help="another checkout whose report code runs on the same CSV, alternating")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare: rounds of the two")
    a = ap.parse_args()

    work = a.keep or Path(tempfile.mkdtemp(prefix="wbc-bench-report-"))
    if a.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        csv_path = build(work, a.rows, a.slides)
        size = csv_path.stat().st_size
        print(f"built {a.rows:,} rows ({size / 2**20:.1f} MiB CSV, {a.slides} slides) in {time.perf_counter() - t0:.1f}s: {csv_path}")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

        # Baseline: an interpreter that imports what the report imports (numpy, PIL, matplotlib).
        base_cmd = [sys.executable, "-c", "import wbc_batch.evaluation.report, wbc_batch.evaluation.plots, PIL.Image, matplotlib.pyplot"]
        subprocess.run(base_cmd, check=True, env=env)
        base_rss = _child_maxrss_mib()

        cmd = [
            sys.executable,
            "-m",
            "wbc_batch",
            "report",
            str(csv_path),
            "-o",
            str(work / "report"),
            "--review-threshold",
            str(a.review_threshold),
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        dt = time.perf_counter() - t0
        rss = _child_maxrss_mib()  # max over the children so far: the report run is the larger one
        html = work / "report" / "report.html"
        print(
            f"command: PYTHONPATH={ROOT} {' '.join(cmd[:1])} -m wbc_batch report {csv_path} -o {work / 'report'} --review-threshold {a.review_threshold}"
        )
        print(f"report time: {dt:.2f} s wall ({a.rows / dt:,.0f} rows/s), interpreter start and imports included")
        print(
            f"peak RSS of the report process: {rss:.0f} MiB (an interpreter importing numpy, PIL, matplotlib and the report module: {base_rss:.0f} MiB)"
        )
        page = html.read_text(encoding="utf-8")
        cells = page.count('<figure class="cell')
        print(
            f"report.html: {html.stat().st_size / 2**20:.2f} MiB, {page.count('<img ')} <img> "
            f"({cells} gallery cells and the review rows with pictures, two each; the confusion matrices); "
            f"files: {', '.join(sorted(p.name for p in (work / 'report').iterdir()))}"
        )
        m = json.loads((work / "report" / "metrics.json").read_text())
        print(f"accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}  counts {m['counts']}")
        if a.compare is not None:
            compare(csv_path, work, [ROOT, a.compare.resolve()], a.rounds, a.review_threshold)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
