"""Classify throughput and memory of this checkout against another source tree, in one run (not run in CI).

Why: a change to the runner (pool lifecycle, signals, locking) must not cost speed or memory, and
this machine's speed drifts between runs; so both versions run alternately (A B A B ...) on the same
file tree with the same model, and the ratio is read within the run.

  git worktree add /tmp/base <commit>
  python bench/bench_versions.py --old-src /tmp/base --model export/wbc-default.onnx --tree 10000 --big 100000

Prints wall seconds, images/s and peak RSS (whole process tree) per run, the median ratio new/old,
and, with --big, the new version's peak RSS on a tree of that many files (flat memory check).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_classify import DEFAULT_DATA, build_tree, run_measured  # noqa: E402


def _cmd(src: Path, model: str, tree: Path, out: Path, workers: int) -> list[str]:
    # -c with sys.path set first: the other tree's wbc_batch wins over the installed one
    code = f"import sys; sys.path.insert(0, {str(src)!r}); from wbc_batch.cli import main; sys.argv[0] = 'wbc-batch'; main()"
    return [sys.executable, "-c", code, "classify", str(tree), "-m", model, "-o", str(out), "--workers", str(workers), "--overwrite", "-q"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", type=Path, required=True, help="source tree of the version to compare with (a git worktree)")
    ap.add_argument("--model", default=str(ROOT / "export" / "wbc-default.onnx"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tree", type=int, default=10000)
    ap.add_argument("--big", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wbc-versions-") as tmp:
        tree = Path(tmp) / "tree"
        build_tree(a.data, a.tree, tree)
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(a.rounds):
            for name, src in (("old", a.old_src.resolve()), ("new", ROOT)):
                wall, rss, main_rss = run_measured(_cmd(src, a.model, tree, Path(tmp) / f"{name}.csv", a.workers))
                rates[name].append(a.tree / wall)
                print(f"round {r + 1} {name}: {wall:.2f} s  {a.tree / wall:.0f} img/s  peak RSS {rss:.0f} MiB (main {main_rss:.0f})", flush=True)
        ratio = statistics.median(n / o for n, o in zip(rates["new"], rates["old"], strict=True))
        print(f"median images/s: old {statistics.median(rates['old']):.0f}, new {statistics.median(rates['new']):.0f}; new/old ratio per round, median {ratio:.3f}")
        if a.big:
            big = Path(tmp) / "big"
            build_tree(a.data, a.big, big)
            wall, rss, main_rss = run_measured(_cmd(ROOT, a.model, big, Path(tmp) / "big.csv", a.workers))
            print(f"new, {a.big} files: {wall:.1f} s  {a.big / wall:.0f} img/s  peak RSS {rss:.0f} MiB (main {main_rss:.0f})")


if __name__ == "__main__":
    main()
