"""The training loop, split as timm's train.py is: data, :func:`train_one_epoch`, :func:`validate`, :func:`train`.

Images are decoded once into memory as uint8 and augmented a batch at a time
(:mod:`.augment`); early stopping and the best checkpoint follow validation macro-F1.
Everything that defines a run is in the :class:`~.record.RunRecord` written to
``config.json``, so ``wbc-batch export RUN_DIR`` rebuilds the network and its preprocessing
from the run folder.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..csv_safety import CsvWriter
from ..evaluation.metrics import Metrics, compute_metrics
from ..inference.preprocess import PreprocessSpec
from . import augment
from .config import FIELD_SIZE, TrainConfig
from .contracts import check_start
from .data import LabelledFiles, balance_weights, decode_all, derived_size, read_group_file, scan_sources, source_split, subsample
from .init_weights import InitSource, init_model, read_init
from .models import BackgroundBalance, CellCrop, Deployable, build_deployable
from .optim import build_optimizer, build_scheduler
from .record import BEST_WEIGHTS, LAST_WEIGHTS, RunRecord, save_weights

__all__ = ["FIELD_SIZE", "TrainConfig", "TrainData", "TrainResult", "load_data", "train", "train_one_epoch", "validate"]


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val_macro_f1: float
    best_val_accuracy: float
    epochs_run: int
    seconds_per_epoch: float
    classes: tuple[str, ...]


@dataclass
class TrainData:
    """Decoded images (N, H, W, 3) uint8, their targets and split groups, and the train/val indices."""

    images: np.ndarray
    targets: np.ndarray
    groups: list[str]
    classes: tuple[str, ...]
    train_idx: np.ndarray
    val_idx: np.ndarray
    unreadable: int
    decode_seconds: float
    sources: np.ndarray | None = None  # data-folder index per image (None: one folder)
    roots: tuple[str, ...] = ()

    def source_of(self) -> np.ndarray:
        return self.sources if self.sources is not None else np.zeros(len(self.targets), dtype=np.int64)

    @property
    def val_is_train(self) -> bool:
        return self.val_idx is self.train_idx

    def val_sources(self) -> list[str]:
        return sorted(set(self.groups[i] for i in self.val_idx))


@dataclass
class Trainer:
    """What one optimisation step needs, fixed for the whole run."""

    model: Deployable
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    device: torch.device
    centres: torch.Tensor | None  # per image, when the network sees a cell crop
    windows: torch.Tensor | None  # per image window side (pixels), with the crop
    label_smoothing: float
    augment: bool
    loss_weights: torch.Tensor | None = None  # per class (imbalance), None: plain cross-entropy
    sample_weights: torch.Tensor | None = None  # per train-split image (source balance), None: a plain shuffle
    colour: str = "mild"  # hsv | wide | strong | mild | none: which colour augmentation (with augment)
    jpeg: float = 0.0  # with hsv, wide or strong colour: share of images re-compressed as JPEG


def scan_data(cfg: TrainConfig) -> LabelledFiles:
    """The run's labelled files: every data folder, the classes asked for."""
    group_map = read_group_file(cfg.groups_file) if cfg.groups_file else None
    return scan_sources(cfg.data_dirs(), cfg.group_regex, group_map, cfg.class_subset)


def load_data(cfg: TrainConfig, spec: PreprocessSpec, files: LabelledFiles | None = None) -> TrainData:
    """Scan the class folders, subsample if asked, decode once, and split by group within each folder."""
    files = files if files is not None else scan_data(cfg)
    idx = subsample(files, cfg.max_per_class, cfg.seed)
    t0 = time.perf_counter()
    images, ok = decode_all([files.paths[i] for i in idx], spec, cfg.workers)
    decode_s = time.perf_counter() - t0
    idx = idx[ok]
    tr, va = source_split(files, idx, cfg.val_fraction, cfg.seed)
    if len(va) == 0:
        va = tr  # too few groups to hold any out: validate on train (flagged in the record)
    sources = files.sources[idx] if files.sources is not None else None
    return TrainData(images[ok], files.targets[idx], [files.groups[i] for i in idx], files.classes, tr, va,
                     int((~ok).sum()), decode_s, sources, files.roots)


def source_summary(data: TrainData) -> list[dict]:
    """Per data folder: its path, the images used and how many of each class (the run record and model card)."""
    src = data.source_of()
    out = []
    for si, root in enumerate(data.roots or ("",)):
        t = data.targets[src == si]
        counts = np.bincount(t, minlength=len(data.classes))
        out.append({"path": root, "files": int(len(t)), "per_class": {c: int(n) for c, n in zip(data.classes, counts, strict=True) if n}})
    return out


def _device(cfg: TrainConfig) -> torch.device:
    """Seeds, threads and the device; CPU runs are made deterministic (a test checks it)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    return device


def _locate(crop: CellCrop, images: np.ndarray, device: torch.device, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's cell centre and window side, found once: the images do not change between epochs."""
    with torch.inference_mode():
        out = [crop.locate(torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float())
               for i in range(0, len(images), batch_size)]
    if not out:
        return torch.zeros((0, 2), device=device), torch.zeros(0, device=device)
    return torch.cat([c for c, _ in out]), torch.cat([w for _, w in out])


def predict_logits(model: Deployable, images: np.ndarray, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Logits of uint8 NHWC images through the deployable model, in eval mode."""
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            outs.append(model(torch.from_numpy(images[i : i + batch_size]).to(device)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _network_input(t: Trainer, images: torch.Tensor, bi: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The normalised (cropped, augmented, balanced) float NCHW batch the network sees, for the uint8 NHWC ``images[bi]``."""
    xb = images[bi].to(t.device).permute(0, 3, 1, 2).float()
    p = augment.draw(len(bi), gen, t.device, colour=t.colour, jpeg=t.jpeg) if t.augment else None
    crop = t.model.crop
    if crop is not None:
        i = bi.to(t.device)
        windows = t.windows[i]
        xb = crop.sample(xb, t.centres[i], windows, augment.window_affine(p.geometry, windows) if p else None)
    elif p is not None:
        xb = augment.rotate_field(xb, p.geometry)
    xb = augment.apply(xb, p) if p is not None else xb
    xb = t.model.balance(xb) if t.model.balance is not None else xb
    return xb * t.model.scale - t.model.shift


def train_one_epoch(t: Trainer, data: TrainData, batch_size: int, gen: torch.Generator, *, desc: str, bar: bool) -> tuple[float, float]:
    """One pass over the training split in a seeded random order; returns (mean loss, accuracy).

    ``bar``: a tqdm bar on stderr for the epoch (only on a terminal: see :func:`train`).
    """
    t.model.train()
    tr = torch.from_numpy(data.train_idx)
    if t.sample_weights is None:
        perm = tr[torch.randperm(len(tr), generator=gen)]
    else:  # several sources: an epoch of as many draws, each source (and class within it) its share
        perm = tr[torch.multinomial(t.sample_weights, len(tr), replacement=True, generator=gen)]
    x_all, y_all = torch.from_numpy(data.images), torch.from_numpy(data.targets)
    loss_sum = correct = seen = 0
    steps = tqdm(range(math.ceil(len(tr) / batch_size)), desc=desc, unit="batch", disable=not bar, leave=False, file=sys.stderr)
    for s in steps:
        bi = perm[s * batch_size : (s + 1) * batch_size]
        xb = _network_input(t, x_all, bi, gen)
        yb = y_all[bi].to(t.device)
        with torch.autocast(t.device.type, enabled=t.scaler.is_enabled()):
            logits = t.model.net(xb)
            loss = F.cross_entropy(logits, yb, weight=t.loss_weights, label_smoothing=t.label_smoothing)
        t.opt.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.opt)
        t.scaler.update()
        if t.sched is not None:
            t.sched.step()
        loss_sum += float(loss.detach()) * len(bi)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(bi)
        steps.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    steps.close()
    return loss_sum / seen, correct / seen


def precise_bn(t: Trainer, data: TrainData, batch_size: int, batches: int, gen: torch.Generator) -> None:
    """Recompute the BatchNorm statistics as the exact mean over up to ``batches`` fresh training batches (pycls's "precise BN").

    Why: the running averages lag weights that move fast under a high learning rate and strong
    colour augmentation, and validation then swings from one epoch to the next (measured on pbc's
    8 classes: 0.82, 0.24, 0.43 accuracy in three epochs).
    The batches are full ones from one shuffled pass over the training split, at most as many as it
    holds: more would draw the same images again for nothing but time (20 batches of 64 were 1,280
    images an epoch for a split of 258), and a short last batch would weigh as much as a full one in
    the cumulative average.
    """
    bns = [m for m in t.model.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0 or len(data.train_idx) == 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    t.model.train()
    tr, x_all = torch.from_numpy(data.train_idx), torch.from_numpy(data.images)
    size = min(batch_size, len(tr))
    order = tr[torch.randperm(len(tr), generator=gen)]
    with torch.no_grad():
        for i in range(min(batches, len(tr) // size)):
            t.model.net(_network_input(t, x_all, order[i * size : (i + 1) * size], gen))
    for m, mo in zip(bns, momenta, strict=True):
        m.momentum = mo


def validate(model: Deployable, images: np.ndarray, targets: np.ndarray, classes: tuple[str, ...], device: torch.device) -> tuple[float, Metrics]:
    """Validation loss (plain cross-entropy) and metrics of the model as it would be exported."""
    logits = predict_logits(model, images, device)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)))
    return loss, compute_metrics(targets, logits.argmax(1), classes)


def _trainer(cfg: TrainConfig, model: Deployable, data: TrainData, device: torch.device) -> Trainer:
    opt = build_optimizer(cfg.optimizer, (p for p in model.parameters() if p.requires_grad), cfg.lr, cfg.weight_decay)
    sched = build_scheduler(cfg.schedule, opt, cfg.lr, math.ceil(len(data.train_idx) / cfg.batch_size) * cfg.epochs)
    centres, windows = _locate(model.crop, data.images, device) if model.crop is not None else (None, None)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    sampling = epoch_weights(cfg, data)
    tt = data.targets[data.train_idx]
    weights = class_weights(tt, len(data.classes), cfg.class_weights, None if sampling is None else sampling * len(tt))
    return Trainer(model, opt, sched, scaler, device, centres, windows, cfg.label_smoothing, cfg.augment,
                   None if weights is None else weights.to(device), None if sampling is None else torch.from_numpy(sampling),
                   cfg.colour, cfg.jpeg)


def epoch_weights(cfg: TrainConfig, data: TrainData) -> np.ndarray | None:
    """Sampling weights over the train split when several data folders are balanced (data.balance_weights), else None."""
    src = data.source_of()[data.train_idx]
    if not cfg.source_balance or len(np.unique(src)) < 2:
        return None
    return balance_weights(data.targets[data.train_idx], src)


#: The largest weight ratio between two classes (see :func:`class_weights`).
MAX_CLASS_WEIGHT_RATIO = 10.0


def class_weights(targets: np.ndarray, n_classes: int, mode: str, draws: np.ndarray | None = None) -> torch.Tensor | None:
    """Loss weight per class so that each class counts as much as the others: n / (classes * n_c).

    Why weights rather than re-sampling: the epoch and its random order stay as they are, and a
    class of 22 images is not shown ten times over per epoch. A class absent from training gets 0.
    Imbalance up to :data:`MAX_CLASS_WEIGHT_RATIO`:1 is evened out fully; a rarer class gets that
    many times the most common class's weight (one image of a class must not outweigh the rest).
    ``draws`` (expected draws per image when several folders are balanced by sampling): None. The
    sampler already gives every class of a folder the same share of that folder's draws; weights
    over the whole epoch on top would favour the classes only one folder has (pbc's IG 3x its
    NEUTROPHIL, when blood-cells holds only the 4 shared ones), i.e. teach that folder a skewed prior.
    """
    if mode not in ("balanced", "none"):
        raise ValueError(f"unknown class_weights {mode!r}; choose balanced or none")
    if mode == "none" or draws is not None:
        return None
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    w = np.divide(len(targets), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
    w = np.minimum(w, MAX_CLASS_WEIGHT_RATIO * w[counts > 0].min()) if (counts > 0).any() else w
    return torch.tensor(w, dtype=torch.float32)


def _record(cfg: TrainConfig, spec: PreprocessSpec, data: TrainData, device: torch.device) -> RunRecord:
    resolved = replace(cfg, size=cfg.resolved_size(), crop=cfg.resolved_crop() or (0, 0), device=str(device), pretrained=cfg.resolved_pretrained())
    return RunRecord(resolved, data.classes, spec.to_dict(), int(len(data.train_idx)), int(len(data.val_idx)),
                     bool(len(data.val_idx) and data.val_is_train), data.val_sources(), str(device), str(torch.__version__),
                     sources=source_summary(data))


def background_colour(cfg: TrainConfig, data: TrainData, device: torch.device, source: InitSource | None = None, n: int = 512) -> list[float] | None:
    """The colour the background balance maps to, or None without colour_norm.

    Fine-tuning from a model that balances: its colour, so the network keeps seeing a lab's images in
    the colours it learned. Otherwise the training images' typical background (median brightest area
    of what the network sees, measured on the cell windows when there is a crop).
    """
    if cfg.colour_norm == "none":
        return None
    if cfg.colour_norm != "background":
        raise ValueError(f"unknown colour_norm {cfg.colour_norm!r}; choose background or none")
    if _inherits_background(cfg, source):
        return list(source.background)
    idx = data.train_idx[np.linspace(0, len(data.train_idx) - 1, min(n, len(data.train_idx))).astype(int)]
    crop = build_deployable(cfg.arch, len(data.classes), cfg.resolved_size(), cfg.resolved_crop(), follow=cfg.crop_follow).crop
    with torch.inference_mode():
        x = torch.from_numpy(data.images[idx]).to(device).permute(0, 3, 1, 2).float()
        x = crop.to(device)(x) if crop is not None else x
        bright = BackgroundBalance.brightest(x).flatten(1)
    return [round(float(v), 2) for v in bright.median(dim=0).values]


def _inherits_background(cfg: TrainConfig, source: InitSource | None) -> bool:
    """Whether the run balances to the --init model's background colour rather than measuring its own."""
    return cfg.colour_norm == "background" and source is not None and source.background is not None


def _init(model: Deployable, source: InitSource, cfg: TrainConfig, data: TrainData, device: torch.device, crop_inherited: bool = False) -> dict:
    """Fine-tuning: the --init weights into ``model`` (head rebuilt for a new class set), said on stderr."""
    done = init_model(model, source, cfg.arch, data.classes, data.images[data.train_idx], device)
    if _inherits_background(cfg, source):
        done["background"] = "inherited"
    if crop_inherited:
        done["crop"] = "inherited"
    head = "same classes" if not done["new"] and done["kept"] == done["classes"] else f"head rebuilt: kept {done['kept']}, new {done['new']}"
    crop = f"; crop {tuple(cfg.crop)} inherited" if crop_inherited else ""
    print(f"init: {done['kind']} {done['from']} ({head}{crop})", file=sys.stderr)
    return done


def _pretrained(model: Deployable, cfg: TrainConfig) -> dict:
    """Transfer: the registry's pretrained weights into ``model`` (classifier fresh), said on stderr."""
    from .archs import get
    from .pretrained import load_pretrained

    done = load_pretrained(model.net, get(cfg.arch), cfg.resolved_pretrained())
    print(f"init: {done['weights']} weights from {done['from']} ({done['tensors']} tensors; classifier fresh)", file=sys.stderr)
    return done


def _log_data(data: TrainData) -> None:
    print(
        f"data: {len(data.images)} images ({data.unreadable} unreadable skipped), {len(data.classes)} classes, "
        f"train {len(data.train_idx)} / val {len(data.val_idx)} images ({len(data.val_sources())} held-out groups), "
        f"decoded in {data.decode_seconds:.1f}s",
        file=sys.stderr,
    )


def _write_history(history: list[dict], path: Path) -> None:
    names = list(history[0])
    with open(path, "w", newline="") as f:
        wr = CsvWriter(f)
        wr.writerow(names)
        wr.writerows([row.get(k, "") for k in names] for row in history)


def _log_epoch(row: dict, improved: bool) -> None:
    print(
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} macro-F1 {row['val_macro_f1']:.4f}  "
        f"{row['seconds']:.1f}s{'  *' if improved else ''}",
        file=sys.stderr, flush=True,
    )


def _fit(cfg: TrainConfig, t: Trainer, data: TrainData, record: RunRecord, run_dir: Path, bar: bool) -> tuple[list[dict], Metrics | None]:
    """Epochs with early stopping on val macro-F1; writes weights, history and the record as it goes."""
    gen = torch.Generator().manual_seed(cfg.seed)
    va = data.val_idx
    history: list[dict] = []
    best: Metrics | None = None
    bad_epochs = 0
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        loss, acc = train_one_epoch(t, data, cfg.batch_size, gen, desc=f"epoch {epoch}/{cfg.epochs}", bar=bar)
        precise_bn(t, data, cfg.batch_size, cfg.precise_bn, gen)
        val_loss, m = validate(t.model, data.images[va], data.targets[va], data.classes, t.device)
        row = {"epoch": epoch, "train_loss": loss, "train_accuracy": acc, "val_loss": val_loss, "val_accuracy": m.accuracy,
               "val_macro_f1": m.macro_f1, "lr": t.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - te}
        history.append(row)
        improved = best is None or m.macro_f1 > best.macro_f1
        if improved:
            best, bad_epochs, record.best_epoch = m, 0, epoch
            save_weights(t.model.net.state_dict(), run_dir / BEST_WEIGHTS)
            (run_dir / "val_confusion.json").write_text(json.dumps({"epoch": epoch, **m.to_dict()}, indent=2))
        else:
            bad_epochs += 1
        save_weights(t.model.net.state_dict(), run_dir / LAST_WEIGHTS)
        record.last_epoch = epoch
        record.write(run_dir)
        _write_history(history, run_dir / "history.csv")
        _log_epoch(row, improved)
        if cfg.patience and bad_epochs >= cfg.patience:
            print(f"early stop: no val macro-F1 gain for {cfg.patience} epochs", file=sys.stderr)
            break
    return history, best


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train one run and write the run dir; returns the best epoch's validation figures.

    Output on stderr: one plain line per epoch (losses, accuracies, val macro-F1, seconds). With
    ``progress`` and stderr a terminal, a bar runs during each epoch too; a log file or a pipe
    gets the lines only, never carriage-return bar frames.
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = _device(cfg)
    files = scan_data(cfg)
    source = read_init(cfg.init_from) if cfg.init_from else None
    cfg = cfg.resolved(source.arch if source else None)  # --init without --arch: the network of the model it starts from
    inherited = source.crop if source is not None and source.arch == cfg.arch else None  # the scale the source learned cells at
    crop_inherited = cfg.crop is None and inherited is not None
    cfg = cfg.with_crop(inherited)
    if not cfg.size and cfg.resolved_crop():  # no --size, a cell crop: the decode size is derived from the images (their median field)
        cfg = replace(cfg, size=derived_size(files.paths))
    h, w = cfg.resolved_size()
    check_start(cfg, len(files.classes))  # a contract the network breaks, or missing weights: an error now, not at export
    spec = PreprocessSpec(height=h, width=w, resize=cfg.resize, keep_aspect=cfg.keep_aspect)
    data = load_data(cfg, spec, files)
    _log_data(data)
    background = background_colour(cfg, data, device, source)
    model = build_deployable(cfg.arch, len(data.classes), (h, w), cfg.resolved_crop(), probabilities=False, follow=cfg.crop_follow,
                             background=background).to(device)
    record = _record(cfg, spec, data, device)
    record.background = background
    if cfg.init_from:
        record.init = _init(model, source, cfg, data, device, crop_inherited)
    elif record.config.pretrained != "none":
        record.init = _pretrained(model, cfg)
    t = _trainer(cfg, model, data, device)
    record.write(run_dir)
    history, best = _fit(cfg, t, data, record, run_dir, bar=progress and sys.stderr.isatty())
    _plot_run(run_dir)
    seconds = float(np.mean([r["seconds"] for r in history]))
    return TrainResult(run_dir, record.best_epoch or 0, best.macro_f1, best.accuracy, len(history), seconds, data.classes)


def _plot_run(run_dir: Path) -> None:
    """curves.png and val_confusion.png, when matplotlib (the report extra) is there."""
    try:
        from ..evaluation.plots import plot_confusion, plot_history
    except ImportError:
        return
    try:
        plot_history(run_dir / "history.csv", run_dir / "curves.png")
    except ImportError:
        print("matplotlib missing: curves.png not written", file=sys.stderr)
        return
    path = run_dir / "val_confusion.json"
    if path.exists():
        d = json.loads(path.read_text())
        plot_confusion(np.asarray(d["confusion_matrix"]), d["labels"], run_dir / "val_confusion.png", title=f"validation, epoch {d['epoch']}")
