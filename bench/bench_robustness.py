"""How a model holds up off its training lab: accuracy and macro-F1 under controlled shifts (not run in CI).

Each condition rewrites the evaluation images (cell scale with the frame cropped or padded, stain
strength in optical-density (HED) space, hue, saturation, white balance, brightness, gamma, blur, JPEG quality,
aspect ratio, single-cell crops cut from the fields) into a temporary class-folder tree, then runs
the real classify path on it (decode included), so a figure here is what a user would get. Other
labs' labelled cells (pbc/test, wbc-tecom) are scored as they are. Any number of models side by
side; one table (markdown), optionally JSON.

  python bench/bench_robustness.py export/wbc-default.onnx [OTHER.onnx ...] [--per-class 150] [--json out.json]

Classes a model does not know (wbc-tecom's one basophil, pbc's platelets ...) are left out of its
score and counted in the table's n. TEST is a few dozen original fields, augmented: read the shifts
as relative to the clean row of the same model, not as absolute accuracies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch import RunnerOptions, classify  # noqa: E402
from wbc_batch.evaluation.metrics import compute_metrics_from_names  # noqa: E402
from wbc_batch.evaluation.report_images import nucleus_centre  # noqa: E402  (the model's own cell finder, in numpy)
from wbc_batch.inference.model import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TEST = DATA / "blood-cells" / "TEST"
OTHER_LABS = {"pbc/test": DATA / "pbc" / "test", "wbc-tecom": DATA / "wbc-tecom"}

# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB), rows = optical density per RGB channel.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class Condition:
    name: str
    group: str
    apply: Callable[[Image.Image], Image.Image]
    jpeg_quality: int | None = None  # None: written losslessly (PNG), so only the shift itself is measured


# -- the shifts (pure functions of an RGB image) ------------------------------------------------
def _border_colour(img: Image.Image) -> tuple[int, ...]:
    a = np.asarray(img)
    edge = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))


def rescale(img: Image.Image, s: float) -> Image.Image:
    """The cell at ``s`` times its size in a frame of the same size: padded with the background, or cropped around the cell.

    Why around the cell: a frame cropped at its centre cuts off-centre cells out of the picture at 2x,
    which measures lost cells, not scale; a microscope user (or a cell analyser) keeps the cell in view.
    """
    w, h = img.size
    big = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    if s > 1:
        cx, cy = (v * s for v in nucleus_centre(np.asarray(img.convert("RGB"))))
        left = int(min(max(cx - w / 2, 0), big.width - w))
        top = int(min(max(cy - h / 2, 0), big.height - h))
        return big.crop((left, top, left + w, top + h))
    out = Image.new("RGB", (w, h), _border_colour(img))
    out.paste(big, ((w - big.width) // 2, (h - big.height) // 2))
    return out


def stain(img: Image.Image, h: float = 1.0, e: float = 1.0) -> Image.Image:
    """Scale the haematoxylin (nuclei) and eosin (cytoplasm, red cells) optical densities."""
    od = -np.log10(np.maximum(np.asarray(img, dtype=np.float64), 1.0) / 255.0)
    hed = od @ _HED_FROM_RGB
    hed[..., 0] *= h
    hed[..., 1] *= e
    rgb = 255.0 * np.power(10.0, -(hed @ _RGB_FROM_HED))
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))


def hue(img: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(shift * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def white_balance(img: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) * np.asarray(gains, dtype=np.float32)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def gamma(img: Image.Image, g: float) -> Image.Image:
    lut = [round(255 * (i / 255) ** g) for i in range(256)] * 3
    return img.point(lut)


def aspect(img: Image.Image, sx: float, sy: float) -> Image.Image:
    w, h = img.size
    return img.resize((round(w * sx), round(h * sy)), Image.Resampling.LANCZOS)


def cell_crop(img: Image.Image, side: int, out: int) -> Image.Image:
    """A single-cell image as a cell analyser exports it: a square around the cell, the cell filling it."""
    x, y = (int(v) for v in nucleus_centre(np.asarray(img.convert("RGB"))))
    box = (x - side // 2, y - side // 2, x - side // 2 + side, y - side // 2 + side)
    sq = Image.new("RGB", (side, side), _border_colour(img))
    sq.paste(img.crop(box).convert("RGB"), (0, 0))
    return sq.resize((out, out), Image.Resampling.LANCZOS) if out != side else sq


def conditions() -> list[Condition]:
    c = [Condition("clean (original files)", "clean", lambda im: im)]
    c += [Condition(f"scale {s}x", "scale", lambda im, s=s: rescale(im, s)) for s in (0.5, 0.75, 1.25, 1.5, 2.0, 2.5)]
    c += [Condition(f"stain H x{h} E x{e}", "stain", lambda im, h=h, e=e: stain(im, h, e))
          for h, e in ((0.7, 1.0), (1.3, 1.0), (1.0, 0.7), (1.0, 1.3), (0.8, 1.2))]
    c += [Condition(f"hue {d:+}", "colour", lambda im, d=d: hue(im, d)) for d in (-0.05, 0.05)]
    c += [Condition(f"saturation x{v}", "colour", lambda im, v=v: ImageEnhance.Color(im).enhance(v)) for v in (0.5, 1.5)]
    c += [Condition("white balance warm (yellow)", "colour", lambda im: white_balance(im, (1.0, 0.95, 0.75)))]
    c += [Condition(f"brightness x{b}", "colour", lambda im, b=b: ImageEnhance.Brightness(im).enhance(b)) for b in (0.8, 1.2)]
    c += [Condition(f"gamma {g}", "colour", lambda im, g=g: gamma(im, g)) for g in (0.7, 1.4)]
    c += [Condition(f"blur r={r}", "quality", lambda im, r=r: im.filter(ImageFilter.GaussianBlur(r))) for r in (1.0, 2.0)]
    c += [Condition(f"JPEG q={q}", "quality", lambda im: im, jpeg_quality=q) for q in (30, 10)]
    c += [Condition("aspect 4:3 -> 1:1 (squashed)", "aspect", lambda im: aspect(im, 0.75, 1.0)),
          Condition("aspect 4:3 -> 16:9 (stretched)", "aspect", lambda im: aspect(im, 1.0, 0.75))]
    c += [Condition("single-cell crop 120 px", "crop", lambda im: cell_crop(im, 120, 120)),
          Condition("single-cell crop 120 -> 360 px", "crop", lambda im: cell_crop(im, 120, 360))]
    return c


# -- running -----------------------------------------------------------------------------------
def select(root: Path, per_class: int) -> list[Path]:
    """Up to ``per_class`` files per class folder, evenly spaced in name order (deterministic)."""
    out: list[Path] = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.is_file())
        if per_class and len(files) > per_class:
            files = [files[i] for i in np.linspace(0, len(files) - 1, per_class).round().astype(int)]
        out += files
    return out


def write_condition(files: Sequence[Path], root: Path, cond: Condition, dest: Path) -> None:
    for f in files:
        rel = f.relative_to(root)
        with Image.open(f) as im:
            out = cond.apply(im.convert("RGB"))
        target = dest / rel.parent / (rel.stem + (".jpg" if cond.jpeg_quality else ".png"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if cond.jpeg_quality:
            out.save(target, quality=cond.jpeg_quality)
        else:
            out.save(target, compress_level=1)


def score(model, folder: Path, workers: int) -> dict:
    """Accuracy, macro-F1 and the share flagged out of domain (None without a domain check) of ``model`` on a
    class-folder tree; truth is the top folder name."""
    labels = list(model.labels)
    t, p, flags, skipped = [], [], [], 0
    for pred in classify([folder], model, options=RunnerOptions(workers=workers)):
        truth = pred.path.split("/")[0].upper()
        if truth not in labels or pred.status != "ok":
            skipped += 1
            continue
        t.append(truth)
        p.append(pred.label)
        flags.append(getattr(pred, "in_domain", None) is False)
    m = compute_metrics_from_names(t, p, labels)
    flagged = float(np.mean(flags)) if model.metadata.domain is not None and flags else None
    return {"n": len(t), "skipped": skipped, "accuracy": m.accuracy, "macro_f1": m.macro_f1, "flagged": flagged}


def run(models: Sequence[str], per_class: int, workers: int) -> list[dict]:
    loaded = [load_model(m, threads=1) for m in models]
    rows = []
    files = select(TEST, per_class)
    for cond in conditions():
        with tempfile.TemporaryDirectory(prefix="wbc-robust-") as tmp:
            if cond.group == "clean":
                folder = Path(tmp) / "tree"
                for f in files:  # links to the original files: the clean row decodes exactly what a user has
                    (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
                    (folder / f.parent.name / f.name).symlink_to(f)
            else:
                folder = Path(tmp) / "tree"
                write_condition(files, TEST, cond, folder)
            rows.append({"data": "TEST", "condition": cond.name, "group": cond.group,
                         "models": [score(m, folder, workers) for m in loaded]})
        print(f"  {cond.name}: " + "  ".join(f"{r['accuracy']:.3f}" for r in rows[-1]["models"]), file=sys.stderr, flush=True)
    for name, root in OTHER_LABS.items():
        if root.is_dir():
            rows.append({"data": name, "condition": "as published", "group": "other lab",
                         "models": [score(m, root, workers) for m in loaded]})
    return rows


def table(rows: Sequence[dict], models: Sequence[str]) -> str:
    head = "| data | condition | n | " + " | ".join(f"{Path(m).name} acc | F1 | Δacc | flagged" for m in models) + " |"
    lines = [head, "|" + "---|" * (3 + 4 * len(models))]
    clean = rows[0]["models"]
    for r in rows:
        cells = []
        for base, s in zip(clean, r["models"], strict=True):
            delta = s["accuracy"] - base["accuracy"] if r["data"] == "TEST" else float("nan")
            flagged = "" if s.get("flagged") is None else f"{s['flagged']:.3f}"
            cells.append(f"{s['accuracy']:.3f} | {s['macro_f1']:.3f} | {'' if delta != delta else f'{delta:+.3f}'} | {flagged}")
        lines.append(f"| {r['data']} | {r['condition']} | {r['models'][0]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="ONNX models with wbc-batch metadata")
    ap.add_argument("--per-class", type=int, default=150, help="TEST files per class for the shifted copies (0 = all 2,487)")
    ap.add_argument("--workers", type=int, default=0, help="classify worker processes (0 = all cores)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args()
    if not TEST.is_dir():
        sys.exit(f"bench_robustness: {TEST} not found (needs ../shared/data beside the repo)")
    rows = run(a.models, a.per_class, a.workers)
    print(table(rows, a.models))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
