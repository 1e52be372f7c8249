"""``wbc-batch train`` and ``wbc-batch export``: torch is imported only when they run."""

from __future__ import annotations

import json

import click

from ..errors import require
from ..training import archs


def _size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
        return h, w
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 96x128, got {value!r}") from None


def _need_torch() -> None:
    require("torch", "train and export need torch (the train extra)")


def _default(name: str) -> str:
    """``[default: X]`` for a TrainConfig field: the help shows the one copy of each default."""
    from ..training.config import TrainConfig

    f = TrainConfig.__dataclass_fields__[name]
    return f"  [default: {f.default}]"


def crop_option(window: int | None, size: int | None) -> tuple[int | None, int | None] | None:
    """(window, out) from --crop-window and --crop-size; None (the config's default) when neither is. A part not
    given stays None: train() fills it once it knows the network (--init's, TrainConfig.with_crop)."""
    return None if window is None and size is None else (window, size)


@click.command("train")
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--run-dir", type=click.Path(file_okay=False), default="runs/train", show_default=True, help="Where weights, history.csv, curves.png and config.json go.")
@click.option("--arch", type=click.Choice(list(archs.ARCHS)), default=None, help=archs.arch_help() + f"  [default: {archs.DEFAULT_ARCH}; with --init, the network of the model it starts from]")
@click.option("--pretrained", type=click.Choice(archs.pretrained_choices()), default=None,
              help="The weights the network starts from: imagenet (installed with the train extra; nothing is downloaded) or none "
                   "(random). --init replaces either with a wbc-batch model's.  [default: imagenet where the architecture has such "
                   f"weights ({', '.join(a.name for a in archs.ARCHS.values() if a.weights)}), else none]")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help=f"Epochs.  [default: the network's: {archs.epochs_help()}]")
@click.option("--size", callback=_size, default=None, help="Decoded input HxW.  [default: derived from the images with a cell crop (see below), else the architecture's own: "
              + ", ".join(f"{a.default_size[0]}x{a.default_size[1]} {a.name}" for a in archs.ARCHS.values()) + "]")
@click.option("--crop-window", type=click.IntRange(min=0), default=None, help="Side (pixels of the decoded field) of the square centred on the cell that the network sees (for a nucleus of 80 px when the window follows it); 0: the whole field.  [default: with --init, the crop that model was trained with (both flags unset); else "
              + ", ".join(f"{a.default_crop[0]} {a.name}" for a in archs.ARCHS.values()) + "]")
@click.option("--crop-size", type=click.IntRange(min=8), default=None, help="The crop window is sampled to this many pixels a side.  [default: with --init, that model's (both crop flags unset); else the architecture's: "
              + ", ".join(f"{a.default_crop[1]} {a.name}" for a in archs.ARCHS.values() if a.default_crop[0]) + "]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step." + _default("batch_size"))
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), default=None, help="Optimiser." + _default("optimizer"))
@click.option("--lr", type=float, default=None, help="Peak learning rate." + _default("lr"))
@click.option("--weight-decay", type=float, default=None, help="Weight decay." + _default("weight_decay"))
@click.option("--schedule", type=click.Choice(["onecycle", "cosine", "constant"]), default=None, help="Learning-rate schedule." + _default("schedule"))
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing." + _default("label_smoothing"))
@click.option("--augment/--no-augment", default=None, help="Rotations, flips, shifts, zoom and colour (see --colour)." + _default("augment"))
@click.option("--val-fraction", type=float, default=None, help="Share of each class's sources held out for validation." + _default("val_fraction"))
@click.option("--group-regex", default=None, help=r"Regex whose group 1 names a file's source image (split unit).  [default: ^_?(\d+)_ ]")
@click.option("--groups", "groups_file", type=click.Path(exists=True, dir_okay=False), default=None, help="CSV with columns path,group (path relative to DATA_DIR): the split unit, e.g. slide or patient; overrides --group-regex.")
@click.option("--patience", type=click.IntRange(min=0), default=None, help="Early stop after this many epochs without val macro-F1 gain (0: never)." + _default("patience"))
@click.option("--seed", type=int, default=None, help="Random seed (CPU runs are deterministic)." + _default("seed"))
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decode processes (0: all cores)." + _default("workers"))
@click.option("--threads", type=click.IntRange(min=0), default=None, help="torch CPU threads (0: torch's default)." + _default("threads"))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where to train." + _default("device"))
@click.option("--max-per-class", type=click.IntRange(min=0), default=None, help="Use at most N images per class (quick runs; 0: all)." + _default("max_per_class"))
@click.option("--init", "init_from", type=click.Path(exists=True), default=None, help="Fine-tune from these weights: a run folder, or an ONNX model exported by wbc-batch (e.g. export/wbc-default.onnx). A different class set rebuilds the classifier (shared classes keep their rows).")
@click.option("--class-weights", type=click.Choice(["balanced", "none"]), default=None, help="balanced: weight each class's loss by n / (classes x n_class) of the training split, so a rare class counts as much as a common one (with several folders balanced by sampling: none, the sampler evens out classes within each)." + _default("class_weights"))
@click.option("--classes", default=None, help="Comma-separated class folders to train on (e.g. EOSINOPHIL,LYMPHOCYTE,MONOCYTE,NEUTROPHIL); the others are left out.  [default: every class folder found]")
@click.option("--keep-aspect/--stretch", "keep_aspect", default=None, help="Decode: fit the image inside the frame and pad with black, or stretch it to the frame (recorded in the model).  [default: keep-aspect]")
@click.option("--crop-follow/--no-crop-follow", "crop_follow", default=None, help="The cell crop's window follows the nucleus' size, so cells are seen at one scale whatever the magnification.  [default: follow]")
@click.option("--colour", type=click.Choice(["hsv", "wide", "strong", "mild", "none"]), default=None, help="Colour augmentation: hsv (wide's, with half the hue turns made in HSV, as image tools turn hue; measured: see the model card), wide (strong's, with hue +-0.12 turn and saturation 0.25-1.6, down to nearly grey), strong (stain amounts in HED space, white balance, hue +-0.08, saturation 0.6-1.4, brightness, contrast, gamma, blur), mild (channel gain, brightness, contrast, saturation) or none." + _default("colour"))
@click.option("--jpeg", type=click.FloatRange(0.0, 1.0), default=None, help="With --colour hsv, wide or strong: the share of training images re-compressed as JPEG at a random quality 10-90 (robustness to camera and file compression); 0: none." + _default("jpeg"))
@click.option("--colour-norm", "colour_norm", type=click.Choice(["background", "none"]), default=None, help="background: the model white-balances each image on its slide background (brightest area) to the training data's background colour, inside the graph; none: colours as decoded." + _default("colour_norm"))
@click.option("--precise-bn", "precise_bn", type=click.IntRange(min=0), default=None, help="After each epoch, recompute BatchNorm statistics over N training batches (at most one pass over the training split), so validation and the exported model use exact ones (0: running averages)." + _default("precise_bn"))
@click.option("--source-balance/--no-source-balance", "source_balance", default=None, help="With several DATA_DIRs: each folder draws the same share of every epoch, classes balanced within it.  [default: on]")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Train on the files this path,label CSV names instead of DATA_DIR's class folders: paths relative to DATA_DIR "
                   "(as classify's --labels), label EXCLUDE leaves a file out; e.g. the corrections.csv a report's review saved. "
                   "They are linked into RUN_DIR/labelled/LABEL/; with --init every class of that model is kept.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (a log file or pipe never gets one: one line per epoch).")
def train_cmd(data_dirs, run_dir, quiet, group_regex, crop_window, crop_size, classes, labels_csv, **kw) -> None:
    """Train a classifier on DATA_DIR/CLASS/*.jpeg (any class names) and write a run dir.

    Several DATA_DIRs (e.g. two labs' images) train one model: classes are matched by folder
    name, and each folder weighs the same per epoch. Validation holds out, within each folder,
    whole source images (by --group-regex; a folder whose file names carry none: single files),
    stratified by class, so augmented copies of one source never sit on both sides. The decode
    size, unless --size, is derived from the images: their median size, scaled so the long side
    is at most 320, rounded to multiples of 8 (240x320 for 320x240 fields).
    """
    _need_torch()
    from ..training.loop import TrainConfig, train

    crop = crop_option(crop_window, crop_size)
    if classes is not None:
        kw["class_subset"] = tuple(sorted({c.strip() for c in classes.split(",") if c.strip()}))
    kw = {k: v for k, v in {**kw, "group_regex": group_regex}.items() if v is not None}  # TrainConfig holds every default
    data_dir = data_dirs[0] if len(data_dirs) == 1 else list(data_dirs)
    if labels_csv:
        data_dir = labelled_data(data_dirs, labels_csv, run_dir, kw)
    cfg = TrainConfig(data_dir=data_dir, run_dir=run_dir, crop=crop, **kw)
    res = train(cfg, progress=not quiet)
    click.echo(
        f"wbc-batch: best epoch {res.best_epoch}/{res.epochs_run}: val accuracy {res.best_val_accuracy:.4f}, "
        f"macro-F1 {res.best_val_macro_f1:.4f}; {res.seconds_per_epoch:.1f} s/epoch -> {res.run_dir}",
        err=True,
    )


def labelled_data(data_dirs: tuple[str, ...], labels_csv: str, run_dir: str, kw: dict) -> str:
    """The class-folder tree of the files ``--labels`` names (see :func:`..training.data.labelled_view`), as the run's data
    folder; ``kw`` gets its groups file and the labels' provenance."""
    from pathlib import Path

    from ..training.data import LABELLED_VIEW, labelled_view, read_group_file
    from ..training.init_weights import read_init

    if len(data_dirs) != 1:
        raise click.UsageError("--labels names files under one DATA_DIR: give one")
    classes = read_init(kw["init_from"]).classes if kw.get("init_from") else ()
    groups = read_group_file(kw["groups_file"]) if kw.get("groups_file") else None
    view = labelled_view(data_dirs[0], labels_csv, Path(run_dir) / LABELLED_VIEW, classes, groups)
    if view.groups_file is not None:
        kw["groups_file"] = str(view.groups_file)
    kw["extra"] = {"labels": {"csv": str(Path(labels_csv).resolve()), "root": str(Path(data_dirs[0]).resolve())}}
    counts = ", ".join(f"{c} {n}" for c, n in view.per_class.items())
    click.echo(f"wbc-batch: training on {sum(view.per_class.values())} files of {labels_csv} ({counts}; {view.excluded} excluded), "
               f"linked under {view.path}", err=True)
    if empty := [c for c, n in view.per_class.items() if not n]:
        click.echo(f"wbc-batch: warning: no file of {', '.join(empty)} in {labels_csv}: the model keeps the class as --init had it, "
                   "but learns nothing new of it, and the exported domain check has no centre for it (its cells are measured "
                   "against the nearest class seen); label a few cells of each class (a confirmed prediction counts)", err=True)
    return str(view.path)


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="model.onnx", show_default=True)
@click.option("--checkpoint", type=click.Choice(["best.pt", "last.pt"]), default="best.pt", show_default=True)
@click.option("--name", default=None, help="Model name stored in the metadata.  [default: output file stem]")
@click.option("--check-dir", type=click.Path(exists=True, file_okay=False), default=None, help="Real images for the parity check.  [default: the run's training data]")
@click.option("--eval-dir", type=click.Path(exists=True, file_okay=False), default=None, help="Labelled class folders (e.g. a TEST set) to evaluate the exported model on; metrics go into its metadata.")
@click.option("--int8", "int8_dir", type=click.Path(exists=True, file_okay=False), default=None, help="Also write MODEL.int8.onnx, statically quantised with images from this folder.")
@click.option("--calibration-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Held-out labelled images (CLASS/ folders; never the test set) to fit the temperature and the domain threshold.  "
                   "[default: the run's validation split when it is held out, else none (temperature 1)]")
@click.option("--temperature", type=click.Choice(["fit", "none"]), default="fit", show_default=True,
              help="fit: temperature-scale the probabilities on the held-out data; none: keep temperature 1 (when the held-out data is not "
                   "like the images the model will meet, e.g. copies of training fields); the metadata records what fitting would give.")
@click.option("--json", "as_json", is_flag=True, help="Print every check's figures as JSON instead of the summary.")
def export_cmd(run_dir, output, checkpoint, name, check_dir, eval_dir, int8_dir, calibration_dir, temperature, as_json) -> None:
    """Export RUN_DIR to one ONNX file (uint8 NHWC in, probabilities out, metadata inside).

    Before writing: onnx.checker full check; onnxruntime vs torch within 1e-4 at batch 1,
    batch 7 and on 256 real images; argmax agreement 100%. Then calibrated probabilities and
    an ood_score output (the domain check) are fitted on the run's data and added to the graph
    (as wbc-batch calibrate does).
    """
    _need_torch()
    from ..training.export import ExportOptions, export_model

    out = export_model(run_dir, output, ExportOptions(checkpoint=checkpoint, name=name, check_dir=check_dir, eval_dir=eval_dir, int8_dir=int8_dir,
                                                      calibration_dir=calibration_dir, temperature=temperature))
    click.echo(json.dumps(out, indent=2) if as_json else "\n".join(export_summary(out, output, eval_dir)))


def export_summary(out: dict, output: str, eval_dir: str | None) -> list[str]:
    """What a person reads after an export: one line per check, ending with the file written."""
    from ..modelfile.calibrate import trust_lines

    p = out["parity"]
    lines = [
        f"parity: onnxruntime vs torch on {p['parity_images']} images, max difference {p['max_abs_diff_all']:.1e} "
        f"(tolerance {p['tolerance']:.0e}), same label on {p['argmax_agreement']:.1%}; opset {p['opset']}, IR {p['ir_version']}",
        *trust_lines(out["trust"]),
    ]
    if "eval" in out:
        e = out["eval"]
        lines.append(f"evaluation on {eval_dir}: accuracy {e['accuracy']:.3f}, macro-F1 {e['macro_f1']:.3f} ({e['n']} images, {e.get('errors', 0)} unreadable)")
    if "int8" in out:
        q = out["int8"]
        acc = f", accuracy {q['int8_accuracy']:.3f} vs {q['float_accuracy']:.3f}" if "int8_accuracy" in q else ""
        lines.append(f"int8: {q.get('output', 'MODEL.int8.onnx')}, {q['speedup']:.2f}x the float network's speed{acc}")
    lines.append(f"wrote {output}")
    return lines
