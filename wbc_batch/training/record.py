"""A run folder's contents, typed: the :class:`RunRecord` (JSON) and the weights (plain state dicts).

Why not one pickled checkpoint: unpickling a run folder from elsewhere can run code.
Weights are plain ``state_dict`` files read with ``torch.load(weights_only=True)``, and
everything else export and fine-tuning need (architecture, sizes, classes, preprocessing,
data facts, epochs) is readable JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..errors import ExitCode, WbcBatchError
from ..inference.metadata import ModelError
from ..inference.preprocess import PreprocessSpec
from .config import TrainConfig

RECORD_FILE = "config.json"
BEST_WEIGHTS = "best.pt"
LAST_WEIGHTS = "last.pt"


class RunFolderError(WbcBatchError, FileNotFoundError):
    """A folder given as a run folder (export's RUN_DIR, ``train --init``) that holds no run record."""

    exit_code = ExitCode.MODEL


_CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}
#: What a run folder written before these settings existed was trained with (their defaults have changed).
_LEGACY = {"keep_aspect": False, "crop_follow": False, "colour": "mild", "colour_norm": "none", "precise_bn": 0, "jpeg": 0.0,
           "pretrained": "none", "arch": "wbc-net", "epochs": 30}


@dataclass
class RunRecord:
    """One run: its config (size, crop and device resolved), classes, data facts and the epochs its weights hold."""

    config: TrainConfig
    classes: tuple[str, ...]
    preprocess: dict
    n_train: int
    n_val: int
    val_is_train: bool = False
    val_sources: list[str] | None = None
    device: str = "cpu"
    torch: str = ""
    best_epoch: int | None = None
    last_epoch: int | None = None
    init: dict | None = None  # what the weights started from (fine-tuning), else None
    sources: list[dict] | None = None  # per data folder: path, files used, per-class counts (see loop.source_summary)
    background: list[float] | None = None  # RGB the background balance maps to (colour_norm background), else None

    @property
    def size(self) -> tuple[int, int]:
        return self.config.resolved_size()

    @property
    def crop(self) -> tuple[int, int] | None:
        return self.config.resolved_crop()

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def epoch_of(self, weights: str) -> int | None:
        return self.last_epoch if weights == LAST_WEIGHTS else self.best_epoch

    def to_dict(self) -> dict:
        """Flat JSON: the config's fields at the top level (as ``config.json`` always had them), then the facts."""
        out = asdict(self.config)
        out.update(size=list(self.size), crop=list(self.crop or (0, 0)))
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"})
        out["classes"] = list(self.classes)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        """Also reads run folders written before the record (no epochs in them); unknown keys are ignored."""
        cfg = TrainConfig(**{**_LEGACY, **{k: v for k, v in d.items() if k in _CONFIG_FIELDS}})
        cfg = replace(cfg, size=tuple(cfg.size) if cfg.size else None, crop=tuple(d.get("crop") or (0, 0)),
                      class_subset=tuple(cfg.class_subset) if cfg.class_subset else None)
        own = {f.name for f in fields(cls)} - {"config"}
        rec = cls(config=cfg, **{k: v for k, v in d.items() if k in own})
        rec.classes = tuple(rec.classes)
        return rec

    def write(self, run_dir: str | os.PathLike[str]) -> None:
        path = Path(run_dir) / RECORD_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, run_dir: str | os.PathLike[str]) -> RunRecord:
        path = Path(run_dir) / RECORD_FILE
        if not path.is_file():
            raise RunFolderError(f"{run_dir} is not a wbc-batch run folder: no {RECORD_FILE}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """A plain state dict (tensors only), written atomically."""
    tmp = Path(str(path) + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict, never unpickling code; run folders from before the record held ``{"state_dict": ...}``."""
    # TorchVersion (a str) sat in those old checkpoints' config: allowed, nothing else is.
    try:
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for one verdict: this file is not usable weights
        raise _load_error(path, e) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return obj


def _load_error(path: str | os.PathLike[str], e: Exception) -> ModelError:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in a line (torch's own text is a paragraph on its defaults).

    The refusal is the safety this module is for, so it is worded as one: the file asks to call
    something (a pickle that could run code), or is not weights at all.
    """
    if isinstance(e, OSError):
        return ModelError(f"{path}: cannot read the weights: {e.strerror or e}")
    if isinstance(e, pickle.UnpicklingError):
        called = re.search(r"GLOBAL ([\w.]+)", str(e))
        if called:
            return ModelError(f"{path}: refused: loading it would call {called.group(1)}, which a file of weights never needs "
                              "(a pickle can run code; weights are tensors only)")
        return ModelError(f"{path}: refused: not a plain file of tensors (weights are tensors only)")
    if isinstance(e, EOFError):
        return ModelError(f"{path}: not a weights file: empty or truncated")
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return ModelError(f"{path}: not a weights file: corrupt ({first[:200]})")
