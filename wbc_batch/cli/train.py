"""``wbc-batch train`` and ``wbc-batch export``: torch is imported only when they run."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click


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
    try:
        import torch  # noqa: F401
    except ImportError:
        click.echo("wbc-batch: error: training and export need the 'train' extra: pip install 'wbc-batch[train]'", err=True)
        sys.exit(2)


#: Options whose default lives only in TrainConfig (click passes None when they are not given).
_TRAIN_DEFAULTS_IN_CONFIG = ("keep_aspect", "crop_follow", "colour", "source_balance")


@click.command("train")
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--run-dir", type=click.Path(file_okay=False), default="runs/train", show_default=True, help="Where weights, history.csv, curves.png and config.json go.")
@click.option("--arch", type=click.Choice(["wbc-net", "seed-cnn"]), default="wbc-net", show_default=True, help="Network: wbc-net (default) or seed-cnn (the study report's baseline).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--size", callback=_size, default=None, help="Decoded input HxW.  [default: 240x320 with a cell crop, else the architecture's own: 60x80 seed-cnn, 96x128 wbc-net]")
@click.option("--crop-window", type=click.IntRange(min=0), default=None, help="Side (pixels of the decoded field) of the square centred on the cell that the network sees; 0: the whole field.  [default: 160 wbc-net, 0 seed-cnn]")
@click.option("--crop-size", type=click.IntRange(min=8), default=128, show_default=True, help="The crop window is sampled to this many pixels a side.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), default="adamw", show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine", "constant"]), default="onecycle", show_default=True)
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--augment/--no-augment", default=True, show_default=True, help="Rotations, flips, shifts, zoom, stain jitter.")
@click.option("--val-fraction", type=float, default=0.15, show_default=True, help="Share of each class's sources held out for validation.")
@click.option("--group-regex", default=None, help=r"Regex whose group 1 names a file's source image (split unit).  [default: ^_?(\d+)_ ]")
@click.option("--groups", "groups_file", type=click.Path(exists=True, dir_okay=False), default=None, help="CSV with columns path,group (path relative to DATA_DIR): the split unit, e.g. slide or patient; overrides --group-regex.")
@click.option("--patience", type=click.IntRange(min=0), default=8, show_default=True, help="Early stop after this many epochs without val macro-F1 gain (0: never).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Decode processes (0: all cores).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="torch CPU threads (0: torch's default).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-per-class", type=click.IntRange(min=0), default=0, show_default=True, help="Use at most N images per class (quick runs).")
@click.option("--init", "init_from", type=click.Path(exists=True), default=None, help="Fine-tune from these weights: a run folder, or an ONNX model exported by wbc-batch (e.g. export/wbc-default.onnx). A different class set rebuilds the classifier (shared classes keep their rows).")
@click.option("--class-weights", type=click.Choice(["balanced", "none"]), default="balanced", show_default=True, help="balanced: weight each class's loss by n / (classes x n_class) of the training split, so a rare class counts as much as a common one.")
@click.option("--classes", default=None, help="Comma-separated class folders to train on (e.g. EOSINOPHIL,LYMPHOCYTE,MONOCYTE,NEUTROPHIL); the others are left out.  [default: every class folder found]")
@click.option("--keep-aspect/--stretch", "keep_aspect", default=None, help="Decode: fit the image inside the frame and pad with black, or stretch it to the frame (recorded in the model).  [default: keep-aspect]")
@click.option("--crop-follow/--no-crop-follow", "crop_follow", default=None, help="The cell crop's window follows the nucleus' size, so cells are seen at one scale whatever the magnification.  [default: follow]")
@click.option("--colour", type=click.Choice(["strong", "mild", "none"]), default=None, help="Colour augmentation: strong (stain amounts in HED space, white balance, hue, saturation, brightness, contrast, gamma, blur), mild (channel gain, brightness, contrast, saturation) or none.  [default: strong]")
@click.option("--source-balance/--no-source-balance", "source_balance", default=None, help="With several DATA_DIRs: each folder draws the same share of every epoch, classes balanced within it.  [default: on]")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (a log file or pipe never gets one: one line per epoch).")
def train_cmd(data_dirs, run_dir, quiet, group_regex, crop_window, crop_size, classes, **kw) -> None:
    """Train a classifier on DATA_DIR/CLASS/*.jpeg (any class names) and write a run dir.

    Several DATA_DIRs (e.g. two labs' images) train one model: classes are matched by folder
    name, and each folder weighs the same per epoch. Validation holds out, within each folder,
    whole source images (by --group-regex; a folder whose file names carry none: single files),
    stratified by class, so augmented copies of one source never sit on both sides. The decode
    size, unless --size, is derived from the images: their median size, scaled so the long side
    is at most 320, rounded to multiples of 8 (240x320 for 320x240 fields).
    """
    _need_torch()
    from ..training.data import DEFAULT_GROUP_REGEX
    from ..training.loop import TrainConfig, train

    crop = None if crop_window is None else (crop_window, crop_size)
    if classes is not None:
        kw["class_subset"] = tuple(sorted({c.strip() for c in classes.split(",") if c.strip()}))
    kw = {k: v for k, v in kw.items() if v is not None or k not in _TRAIN_DEFAULTS_IN_CONFIG}
    data_dir = data_dirs[0] if len(data_dirs) == 1 else list(data_dirs)
    cfg = TrainConfig(data_dir=data_dir, run_dir=run_dir, group_regex=group_regex or DEFAULT_GROUP_REGEX, crop=crop, **kw)
    res = train(cfg, progress=not quiet)
    click.echo(
        f"wbc-batch: best epoch {res.best_epoch}/{res.epochs_run}: val accuracy {res.best_val_accuracy:.4f}, "
        f"macro-F1 {res.best_val_macro_f1:.4f}; {res.seconds_per_epoch:.1f} s/epoch -> {res.run_dir}",
        err=True,
    )


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
def export_cmd(run_dir, output, checkpoint, name, check_dir, eval_dir, int8_dir, calibration_dir) -> None:
    """Export RUN_DIR to one ONNX file (uint8 NHWC in, probabilities out, metadata inside).

    Before writing: onnx.checker full check; onnxruntime vs torch within 1e-4 at batch 1,
    batch 7 and on 256 real images; argmax agreement 100%. Then calibrated probabilities and
    an ood_score output (the domain check) are fitted on the run's data and added to the graph
    (as wbc-batch calibrate does).
    """
    _need_torch()
    from ..evaluation.evaluate import evaluate_model
    from ..training.export import embed_metrics, export_run

    rep = export_run(run_dir, output, checkpoint=checkpoint, name=name, check_dir=check_dir)
    click.echo(json.dumps({"parity": asdict(rep)}, indent=2))
    from ..training.calibrate import calibrate_export

    click.echo(json.dumps({"trust": calibrate_export(run_dir, output, calibration_dir)}, indent=2))
    if eval_dir:
        m = evaluate_model(output, eval_dir)
        embed_metrics(output, m)
        click.echo(json.dumps({"eval": m}, indent=2))
    if int8_dir:
        from ..training.quantize import quantize_model

        q = quantize_model(output, int8_dir, eval_dir=eval_dir)
        click.echo(json.dumps({"int8": q}, indent=2))
