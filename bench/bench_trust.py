"""Can a lab trust a model's answers? Calibration, the domain check and the review queue, measured (not run in CI).

For each model: on TEST, the expected calibration error (ECE), the share flagged out of domain, and
what a review queue ranked by risk buys (errors caught when the 10% riskiest are checked, accuracy
of the rest when the 15% riskiest are checked); on wbc-tecom and pbc/test (other labs, never trained
on), the share flagged and the accuracy among the images left in domain; on non-cell inputs built
here from TEST fields and from nothing (blank fields, red cells only, noise, flat colours, text),
the share flagged. Everything goes through the Python API's classify, as a user's run would.

  python bench/bench_trust.py export/wbc-default.onnx [OTHER.onnx ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch import RunnerOptions, classify  # noqa: E402
from wbc_batch.evaluation.reliability import coverage_point, expected_calibration_error  # noqa: E402
from wbc_batch.evaluation.report_images import nucleus_centre  # noqa: E402
from wbc_batch.inference.model import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = {"TEST": DATA / "blood-cells" / "TEST", "pbc/test": DATA / "pbc" / "test", "wbc-tecom": DATA / "wbc-tecom"}


def make_non_cells(dest: Path, n: int = 40, seed: int = 0) -> Path:
    """Inputs that hold no white cell: what a domain check must flag (written as PNG under dest/NONCELL/)."""
    rng = np.random.default_rng(seed)
    out = dest / "NONCELL"
    out.mkdir(parents=True)
    fields = sorted(SETS["TEST"].rglob("*.jpeg"))
    for i, f in enumerate(fields[j] for j in rng.choice(len(fields), n, replace=False)):
        im = Image.open(f).convert("RGB")
        x, y = nucleus_centre(np.asarray(im))
        qx, qy = (0 if x > 160 else 210), (0 if y > 120 else 160)  # the quarter farthest from the white cell
        patch = im.crop((qx, qy, qx + 110, qy + 80))
        patch.resize((320, 240)).save(out / f"redcells-zoomed_{i:03d}.png")
        tiled = Image.new("RGB", (330, 240))
        for tx in range(3):
            for ty in range(3):
                tiled.paste(patch if (tx + ty) % 2 == 0 else patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (tx * 110, ty * 80))
        tiled.crop((0, 0, 320, 240)).save(out / f"redcells-tiled_{i:03d}.png")
        bg = tuple(int(v) for v in np.median(np.asarray(im).reshape(-1, 3), axis=0))
        Image.new("RGB", (320, 240), bg).save(out / f"blank_{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(out / f"noise_{i:03d}.png")
        Image.new("RGB", (320, 240), tuple(int(v) for v in rng.integers(0, 256, 3))).save(out / f"flat_{i:03d}.png")
        page = Image.new("RGB", (320, 240), "white")
        d = ImageDraw.Draw(page)
        for k in range(6):
            d.text((10, 10 + 35 * k), "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "), 30)), fill=(0, 0, 0), font_size=24)
        page.save(out / f"text_{i:03d}.png")
    return dest


def run_set(model, folder: Path) -> dict:
    rows = [p for p in classify([folder], model, options=RunnerOptions()) if p.status == "ok"]
    labels = list(model.labels)
    truth = np.array([p.path.split("/")[0].upper() for p in rows])
    pred = np.array([p.label for p in rows])
    conf = np.array([p.confidence for p in rows])
    score = getattr(rows[0], "ood_score", None) if rows else None
    flagged = np.array([p.in_domain is False for p in rows]) if score is not None else np.zeros(len(rows), bool)
    known = np.isin(truth, labels)
    ok = pred == truth
    out = {"n": len(rows), "flagged": float(flagged.mean()) if len(rows) else float("nan")}
    if known.any():
        k = known & ~flagged
        out |= {"accuracy": float(ok[known].mean()), "in_domain_accuracy": float(ok[k].mean()) if k.any() else float("nan"),
                "ece": expected_calibration_error(conf[known], ok[known]),
                "catch10": coverage_point(1 - conf[known], ok[known], 0.10).caught,
                "rest15": coverage_point(1 - conf[known], ok[known], 0.15).accepted_accuracy}
    else:
        kinds = np.array([Path(p.path).name.split("_")[0] for p in rows])
        out["by_kind"] = {kd: float(flagged[kinds == kd].mean()) for kd in sorted(set(kinds))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wbc-trust-") as tmp:
        sets = {**SETS, "non-cell": make_non_cells(Path(tmp))}
        for path in a.models:
            model = load_model(path, threads=1)
            print(f"## {path}")
            print("| data | n | accuracy | ECE | flagged out of domain | accuracy in domain | errors caught, 10% reviewed | accuracy of the rest, 15% reviewed |")
            print("|---|---|---|---|---|---|---|---|")
            for name, folder in sets.items():
                if not folder.is_dir():
                    continue
                r = run_set(model, folder)
                cells = [f"{r[k]:.3f}" if k in r else "" for k in ("accuracy", "ece", "flagged", "in_domain_accuracy", "catch10", "rest15")]
                print(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
                if "by_kind" in r:
                    print("| non-cell by kind | | | | " + ", ".join(f"{k} {v:.2f}" for k, v in r["by_kind"].items()) + " | | | |")


if __name__ == "__main__":
    main()
