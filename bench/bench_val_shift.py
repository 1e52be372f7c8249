"""Run folders scored on their own validation split under the robustness bench's shifts: a way to choose a recipe
(or a seed) for robustness without looking at TEST or at another lab's data.

    python bench/bench_val_shift.py runs/a runs/b ... [--json out.json]

Each run's validation split is read back from its ``config.json`` (``val_sources``: whole held-out source images of
every data folder), so runs with the same seed and data share it and are compared image for image. The images are
rewritten under each of ``bench_robustness``'s shifts (scale up to 2x, stain, colour, quality; plus HSV hue +-0.1),
decoded as the run decodes, and classified by the run's own network in torch (the deployable model: the same graph
the export writes, checked to 1e-4 there). Prints one markdown table: accuracy per condition, and ``in scope``, the
mean over the conditions a model is held to within 3 points of clean (clean, scale 0.5-2x, the stain rows, hue +-0.05,
saturation, white balance; docs/studies/robustness.md). Needs the ``train`` extra; uses the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_robustness as b  # noqa: E402

IN_SCOPE = ("clean", "scale 0.5x", "scale 0.75x", "scale 1.25x", "scale 1.5x", "scale 2.0x", "stain", "hue -0.05",
            "hue +0.05", "saturation", "white balance")


def conditions() -> list[b.Condition]:
    keep = [c for c in b.conditions() if c.group in ("clean", "stain", "colour", "quality") or c.name in IN_SCOPE]
    return keep + [b.Condition(f"hue {d:+}", "colour", lambda im, d=d: b.hue(im, d)) for d in (-0.1, 0.1)]


def in_scope(name: str) -> bool:
    return any(name.startswith(k) for k in IN_SCOPE)


def _write(args: tuple) -> list[str]:
    """One condition's copies of the validation files (a process each: PIL work is the slow part)."""
    ci, files, roots, dest = args
    cond = conditions()[ci]
    out = []
    for si, f in files:
        root, target = Path(roots[si]), dest / str(ci) / str(si)
        b.write_condition([Path(f)], root, cond, target)
        rel = Path(f).relative_to(root)
        out.append(str(target / rel.parent / (rel.stem + (".jpg" if cond.jpeg_quality else ".png"))))
    return out


def validation_files(config: dict) -> tuple[list[tuple[int, str]], np.ndarray, tuple[str, ...]]:
    """(source index, path) of the run's validation images, their class indices, and the classes."""
    from wbc_batch.training.data import scan_sources

    files = scan_sources(config["data_dir"], config["group_regex"], None, config["class_subset"])
    val = set(config["val_sources"])
    keep = [i for i, g in enumerate(files.groups) if g in val]
    return [(int(files.source_of()[i]), files.paths[i]) for i in keep], files.targets[keep], files.classes


def score_split(runs: list[str], config: dict, tmp: Path, workers: int) -> dict[str, dict[str, float]]:
    """Accuracy per condition of every run sharing one validation split."""
    import torch

    from wbc_batch.training.data import decode_all
    from wbc_batch.training.export import load_run
    from wbc_batch.training.loop import predict_logits

    sel, targets, classes = validation_files(config)
    conds = conditions()
    with ProcessPoolExecutor(workers or None) as pool:
        paths = list(pool.map(_write, [(ci, sel, config["data_dir"], tmp) for ci in range(len(conds))]))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = [load_run(r)[:2] for r in runs]
    if any(tuple(rec.classes) != tuple(classes) for _, rec in loaded):
        raise SystemExit(f"bench_val_shift: a run of {runs} has other classes than its data folders")
    res: dict[str, dict[str, float]] = {r: {} for r in runs}
    for ci, c in enumerate(conds):
        imgs, ok = decode_all(paths[ci], loaded[0][1].spec, workers)
        for r, (m, _) in zip(runs, loaded, strict=True):
            pred = predict_logits(m.to(dev), imgs, dev).argmax(1)
            res[r][c.name] = float((pred[ok] == targets[ok]).mean())
    print(f"  split of {runs[0]}: {len(sel)} validation images, {len(runs)} runs", file=sys.stderr, flush=True)
    return res


def table(res: dict[str, dict[str, float]]) -> str:
    runs = list(res)
    names = list(res[runs[0]])
    lines = ["| condition | " + " | ".join(Path(r).name for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    lines += [f"| {n} | " + " | ".join(f"{res[r][n]:.3f}" for r in runs) + " |" for n in names]
    mean = [np.mean([v for k, v in res[r].items() if in_scope(k)]) for r in runs]
    return "\n".join(lines + ["| **in scope (mean)** | " + " | ".join(f"**{m:.3f}**" for m in mean) + " |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders written by wbc-batch train")
    ap.add_argument("--workers", type=int, default=0, help="processes for rewriting and decoding (0 = all cores)")
    ap.add_argument("--json", type=Path, help="also write {run: {condition: accuracy}} here")
    a = ap.parse_args()
    splits: dict[tuple, list[str]] = {}
    for r in a.runs:
        cfg = json.loads((Path(r) / "config.json").read_text())
        splits.setdefault(tuple(cfg["val_sources"]), []).append(r)
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="wbc-valshift-") as tmp:
        for k, runs in enumerate(splits.values()):
            cfg = json.loads((Path(runs[0]) / "config.json").read_text())
            res.update(score_split(runs, cfg, Path(tmp) / str(k), a.workers))
    print(table({r: res[r] for r in a.runs}))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
