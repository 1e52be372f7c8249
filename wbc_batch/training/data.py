"""Labelled class-per-folder data, decoded once into memory, and a split that does not leak.

The blood-cell set holds augmented copies of each source microscope image, so a random
validation split shares sources with training and overstates accuracy. :func:`group_split`
keeps every group on one side. Groups come from a file-name regex (``_{PREFIX}_`` here) or,
better where the lab knows them (slide, patient, source image), from a ``path,group`` CSV:
in this data set the prefix is not a reliable source id (the same field appears under
several prefixes), which is why its validation figures run high.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..inference.discover import is_image_name
from ..inference.preprocess import ImageError, PreprocessSpec, load_image

#: Fits ``_{PREFIX}_{ID}.jpeg``, the prefix the data set README calls the source image (see module doc).
DEFAULT_GROUP_REGEX = r"^_?(\d+)_"


@dataclass(frozen=True)
class LabelledFiles:
    paths: tuple[str, ...]
    targets: np.ndarray  # int64 class index per file
    groups: tuple[str, ...]  # split unit per file (class + source)
    classes: tuple[str, ...]


def read_group_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``path,group`` CSV (path relative to the data dir, ``/``-separated) -> {path: group}."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: a groups CSV needs a header with 'path' and 'group' columns, got {reader.fieldnames}")
            out: dict[str, str] = {}
            for row in reader:
                p, g = (row.get("path") or "").strip().replace("\\", "/"), (row.get("group") or "").strip()
                if not p or not g:
                    raise ValueError(f"{path}: line {reader.line_num}: empty path or group")
                out[p] = g
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def scan_class_folders(
    root: str | os.PathLike[str], group_regex: str = DEFAULT_GROUP_REGEX, group_map: Mapping[str, str] | None = None
) -> LabelledFiles:
    """Files under ``root/CLASS/`` (any class names, sorted), with their split groups.

    With ``group_map`` (relative path -> group) every file must be listed; its groups are not
    per class, so a slide or patient with cells of several classes stays on one side whole.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least two class folders, found {classes}")
    pattern = re.compile(group_regex)
    paths: list[str] = []
    targets: list[int] = []
    groups: list[str] = []
    for ci, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not is_image_name(name):
                    continue
                path = os.path.join(dirpath, name)
                paths.append(path)
                targets.append(ci)
                if group_map is not None:
                    groups.append(group_map.get(Path(path).relative_to(root).as_posix(), ""))
                    continue
                m = pattern.search(name)
                # A file whose name does not match is its own group (no leak possible).
                groups.append(f"{cls}/{m.group(1) if m else name}")
    if not paths:
        raise ValueError(f"no images found under {root}")
    missing = [Path(p).relative_to(root).as_posix() for p, g in zip(paths, groups, strict=True) if not g]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} images have no group in the groups file, e.g. {missing[:3]}")
    return LabelledFiles(tuple(paths), np.asarray(targets, dtype=np.int64), tuple(groups), tuple(classes))


def group_split(
    targets: np.ndarray, groups: Sequence[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): whole groups go to one side, about ``val_fraction`` of each class's groups."""
    rng = np.random.default_rng(seed)
    groups_arr = np.asarray(groups)
    val_groups: set[str] = set()
    for c in np.unique(targets):
        g = np.unique(groups_arr[targets == c])
        rng.shuffle(g)
        n_val = max(1, round(len(g) * val_fraction)) if len(g) > 1 and val_fraction > 0 else 0
        val_groups.update(g[:n_val].tolist())
    is_val = np.fromiter((g in val_groups for g in groups_arr), dtype=bool, count=len(groups_arr))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _load(args: tuple[str, PreprocessSpec]) -> np.ndarray | None:
    path, spec = args
    try:
        return load_image(path, spec)
    except ImageError:
        return None


def decode_all(paths: Sequence[str], spec: PreprocessSpec, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decode every file once, through the classify path, into one ``(N, H, W, 3)`` uint8 array.

    Returns the array and a boolean mask of the files that decoded (bad files are dropped, not fatal).
    """
    workers = workers or (os.cpu_count() or 1)
    out = np.zeros((len(paths), spec.height, spec.width, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    jobs = ((p, spec) for p in paths)
    if workers <= 1:
        results = map(_load, jobs)
        for i, arr in enumerate(results):
            if arr is not None:
                out[i], ok[i] = arr, True
    else:
        with ProcessPoolExecutor(workers) as pool:
            for i, arr in enumerate(pool.map(_load, jobs, chunksize=64)):
                if arr is not None:
                    out[i], ok[i] = arr, True
    return out, ok
