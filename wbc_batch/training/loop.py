"""The training loop: in-memory uint8 data, batch augmentation, early stopping on val macro-F1.

Everything that defines a run is in :class:`TrainConfig` and written to ``config.json``,
so ``wbc-batch export RUN_DIR`` rebuilds the network and its preprocessing from the run dir.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..evaluation.metrics import compute_metrics
from ..inference.preprocess import PreprocessSpec
from .data import DEFAULT_GROUP_REGEX, decode_all, group_split, read_group_file, scan_class_folders
from .models import DEFAULT_ARCH, CellCrop, Deployable, build_deployable, default_crop, default_size, net_input_size

#: Decode size when a cell crop is used: the full field at the data set's native resolution.
FIELD_SIZE = (240, 320)


@dataclass
class TrainConfig:
    data_dir: str
    run_dir: str
    arch: str = DEFAULT_ARCH
    size: tuple[int, int] | None = None  # (height, width) of the decoded field; None: see resolved_size
    crop: tuple[int, int] | None = None  # (window, out) cell crop; None: the architecture's default; (0, 0): none
    resize: str = "bilinear"
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | sgd | adam
    lr: float = 2e-3
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    label_smoothing: float = 0.1
    augment: bool = True
    val_fraction: float = 0.15
    group_regex: str = DEFAULT_GROUP_REGEX
    groups_file: str | None = None  # path,group CSV; overrides group_regex
    patience: int = 8
    seed: int = 0
    workers: int = 0  # decode processes; 0 = all cores
    threads: int = 0  # torch CPU threads; 0 = all cores
    device: str = "auto"  # auto | cpu | cuda
    max_per_class: int = 0  # 0 = all; >0 subsamples (quick runs, tests)
    extra: dict = field(default_factory=dict)

    def resolved_crop(self) -> tuple[int, int] | None:
        crop = tuple(self.crop) if self.crop is not None else default_crop(self.arch)
        return crop if crop[0] > 0 else None  # type: ignore[return-value]

    def resolved_size(self) -> tuple[int, int]:
        if self.size:
            return tuple(self.size)  # type: ignore[return-value]
        # A cell crop works on the whole field at this data set's native 240x320.
        return FIELD_SIZE if self.resolved_crop() else default_size(self.arch)

    def net_input_size(self) -> tuple[int, int]:
        return net_input_size(self.resolved_size(), self.resolved_crop())


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val_macro_f1: float
    best_val_accuracy: float
    epochs_run: int
    seconds_per_epoch: float
    classes: tuple[str, ...]


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(dev)


def _random_rotation(n: int, gen: torch.Generator, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos/scale, sin/scale, flip sign, and a unit shift in [-1, 1]^2: any rotation, a flip, zoom 0.9-1.1."""
    angle = _uniform(n, -math.pi, math.pi, gen, dev)
    scale = _uniform(n, 0.9, 1.1, gen, dev)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(dev)
    shift = torch.stack([_uniform(n, -1, 1, gen, dev), _uniform(n, -1, 1, gen, dev)], dim=1)
    return torch.cos(angle) / scale, torch.sin(angle) / scale, flip, shift


def _augment_geometry(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Whole-field augmentation on a float NCHW batch: any rotation, flips, shift of 10%, zoom."""
    n, _, h, w = x.shape
    cos, sin, flip, shift = _random_rotation(n, gen, x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    # Rotation in pixel space, written in the normalised coordinates affine_grid uses.
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * flip * w / h
    theta[:, 1, 1] = cos
    theta[:, :, 2] = shift * 0.1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _window_affine(n: int, window: int, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """(N, 2, 3) maps of crop-window offsets (pixels): any rotation about the cell, a flip, zoom, shift of 8%."""
    cos, sin, flip, shift = _random_rotation(n, gen, dev)
    a = torch.zeros(n, 2, 3, device=dev)
    a[:, 0, 0] = cos * flip
    a[:, 0, 1] = -sin
    a[:, 1, 0] = sin * flip
    a[:, 1, 1] = cos
    a[:, :, 2] = shift * (0.08 * window)
    return a


def _stain_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Stain / illumination on a float NCHW 0..255 batch: per-channel gain, brightness, contrast, saturation."""
    n, dev = x.shape[0], x.device
    gain = (torch.rand(n, 3, generator=gen).to(dev) * 0.16 + 0.92).view(n, 3, 1, 1)
    bright = _uniform(n, 0.85, 1.15, gen, dev).view(n, 1, 1, 1)
    contrast = _uniform(n, 0.8, 1.2, gen, dev).view(n, 1, 1, 1)
    sat = _uniform(n, 0.75, 1.25, gen, dev).view(n, 1, 1, 1)
    x = x * gain * bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * sat + gray
    return x.clamp_(0, 255)


def _centres(crop: CellCrop, images: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        out = [crop.centres(torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float())
               for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, 2), device=device)


def _predict(model: Deployable, images: np.ndarray, device: torch.device, batch_size: int = 256) -> np.ndarray:
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            xb = torch.from_numpy(images[i : i + batch_size]).to(device)
            outs.append(model(xb).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["val_loss"] for h in history], label="val")
    a.set(title="loss", xlabel="epoch")
    a.legend()
    b.plot(ep, [h["train_accuracy"] for h in history], label="train")
    b.plot(ep, [h["val_accuracy"] for h in history], label="val")
    b.plot(ep, [h["val_macro_f1"] for h in history], label="val macro-F1", linestyle="--")
    b.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train one run and write the run dir; returns the best epoch's validation figures."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    h, w = cfg.resolved_size()
    crop_cfg = cfg.resolved_crop()
    spec = PreprocessSpec(height=h, width=w, resize=cfg.resize)

    group_map = read_group_file(cfg.groups_file) if cfg.groups_file else None
    files = scan_class_folders(cfg.data_dir, cfg.group_regex, group_map)
    idx = np.arange(len(files.paths))
    if cfg.max_per_class:
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(files.targets == c))[: cfg.max_per_class] for c in range(len(files.classes))]))
    paths = [files.paths[i] for i in idx]
    targets = files.targets[idx]
    groups = [files.groups[i] for i in idx]
    t0 = time.perf_counter()
    images, ok = decode_all(paths, spec, cfg.workers)
    decode_s = time.perf_counter() - t0
    images, targets, groups = images[ok], targets[ok], [g for g, k in zip(groups, ok, strict=True) if k]
    tr, va = group_split(targets, groups, cfg.val_fraction, cfg.seed)
    if len(va) == 0:
        va = tr  # too few groups to hold any out: validate on train (flagged in config.json)
    print(
        f"data: {len(images)} images ({int((~ok).sum())} unreadable skipped), {len(files.classes)} classes, "
        f"train {len(tr)} / val {len(va)} images ({len(set(groups[i] for i in va))} held-out groups), decoded in {decode_s:.1f}s",
        file=sys.stderr,
    )

    model = build_deployable(cfg.arch, len(files.classes), (h, w), crop_cfg, probabilities=False).to(device)
    net, crop = model.net, model.crop
    centres = _centres(crop, images, device) if crop is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.schedule == "onecycle":
        sched: torch.optim.lr_scheduler.LRScheduler | None = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = None
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(cfg.seed)
    config_out = {**asdict(cfg), "size": [h, w], "crop": list(crop_cfg) if crop_cfg else [0, 0], "classes": list(files.classes), "preprocess": spec.to_dict(),
                  "n_train": int(len(tr)), "n_val": int(len(va)), "val_is_train": bool(len(va) and va is tr),
                  "val_sources": sorted(set(groups[i] for i in va)), "device": str(device),
                  "torch": torch.__version__}
    (run_dir / "config.json").write_text(json.dumps(config_out, indent=2))

    history: list[dict] = []
    best = (-1.0, -1.0, 0)  # macro-F1, accuracy, epoch
    bad_epochs = 0
    epoch_times = []
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(targets)
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        model.train()
        perm = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
        loss_sum = correct = seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress, leave=False, file=sys.stderr)
        for s in bar:
            bi = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb = x_all[bi].to(device).permute(0, 3, 1, 2).float()
            yb = y_all[bi].to(device)
            if crop is not None:
                affine = _window_affine(len(bi), crop.window, gen, device) if cfg.augment else None
                xb = crop.sample(xb, centres[bi.to(device)], affine)
            elif cfg.augment:
                xb = _augment_geometry(xb, gen)
            if cfg.augment:
                xb = _stain_jitter(xb, gen)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model.net(xb * model.scale - model.shift)
                loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if sched is not None:
                sched.step()
            loss_sum += float(loss.detach()) * len(bi)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(bi)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        logits_val = _predict(model, images[va], device)
        val_loss = float(F.cross_entropy(torch.from_numpy(logits_val), torch.from_numpy(targets[va])))
        m = compute_metrics(targets[va], logits_val.argmax(1), files.classes)
        epoch_times.append(time.perf_counter() - te)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen, "val_loss": val_loss,
               "val_accuracy": m.accuracy, "val_macro_f1": m.macro_f1, "lr": opt.param_groups[0]["lr"], "seconds": epoch_times[-1]}
        history.append(row)
        improved = m.macro_f1 > best[0]
        if improved:
            best = (m.macro_f1, m.accuracy, epoch)
            bad_epochs = 0
            torch.save({"state_dict": net.state_dict(), "config": config_out, "epoch": epoch}, run_dir / "best.pt")
            (run_dir / "val_confusion.json").write_text(json.dumps({"epoch": epoch, **m.to_dict()}, indent=2))
        else:
            bad_epochs += 1
        torch.save({"state_dict": net.state_dict(), "config": config_out, "epoch": epoch}, run_dir / "last.pt")
        with open(run_dir / "history.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(row))
            wr.writeheader()
            wr.writerows(history)
        print(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
            f"val loss {val_loss:.4f} acc {m.accuracy:.4f} macro-F1 {m.macro_f1:.4f}  {epoch_times[-1]:.1f}s{'  *' if improved else ''}",
            file=sys.stderr, flush=True,
        )
        if cfg.patience and bad_epochs >= cfg.patience:
            print(f"early stop: no val macro-F1 gain for {cfg.patience} epochs", file=sys.stderr)
            break
    try:
        _plot_curves(history, run_dir / "curves.png")
    except ImportError:
        print("matplotlib missing: curves.png not written", file=sys.stderr)
    _plot_val_confusion(run_dir)
    return TrainResult(run_dir, best[2], best[0], best[1], len(history), float(np.mean(epoch_times)), files.classes)


def _plot_val_confusion(run_dir: Path) -> None:
    path = run_dir / "val_confusion.json"
    if not path.exists():
        return
    try:
        from ..evaluation.plots import plot_confusion
    except ImportError:
        return
    d = json.loads(path.read_text())
    plot_confusion(np.asarray(d["confusion_matrix"]), d["labels"], run_dir / "val_confusion.png", title=f"validation, epoch {d['epoch']}")

