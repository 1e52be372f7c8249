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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..csv_safety import starts_formula
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
    sources: np.ndarray | None = None  # int index of the data folder each file came from (None: one folder)
    roots: tuple[str, ...] = ()  # the data folders, in source-index order

    def source_of(self) -> np.ndarray:
        """Source index per file (all 0 for one folder)."""
        return self.sources if self.sources is not None else np.zeros(len(self.paths), dtype=np.int64)


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
    if formulas := [c for c in classes if starts_formula(c)]:
        raise ValueError(f"{root}: class folder names become the model's labels, and a label may not start with = + - @ TAB or CR"
                         f" (a spreadsheet runs such a cell): rename {formulas}")
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


def scan_sources(
    roots: Sequence[str | os.PathLike[str]],
    group_regex: str = DEFAULT_GROUP_REGEX,
    group_map: Mapping[str, str] | None = None,
    classes: Sequence[str] | None = None,
) -> LabelledFiles:
    """Several class-folder directories (labs, scanners) as one labelled set.

    Classes are the union of the folders' class names (sorted), or ``classes`` when given: only
    those are kept, and each must exist in some folder. Groups are made per folder by
    :func:`scan_class_folders` (``group_map`` applies to the first folder only) and prefixed with
    the folder's index when there are several, so two labs' ``_0_`` never merge. One folder and
    no ``classes`` give exactly :func:`scan_class_folders`.
    """
    scans = [scan_class_folders(r, group_regex, group_map if i == 0 else None) for i, r in enumerate(roots)]
    if len(scans) == 1 and classes is None:
        return replace(scans[0], roots=(str(roots[0]),))
    found = sorted(set().union(*(f.classes for f in scans)))
    keep = tuple(sorted(classes)) if classes is not None else tuple(found)
    missing = sorted(set(keep) - set(found))
    if missing:
        raise ValueError(f"class(es) {missing} found in none of the data folders (their classes: {found})")
    if len(keep) < 2:
        raise ValueError(f"training needs at least two classes, got {list(keep)}")
    paths, targets, groups, sources = [], [], [], []
    for si, f in enumerate(scans):
        for p, t, g in zip(f.paths, f.targets, f.groups, strict=True):
            if f.classes[t] in keep:
                paths.append(p)
                targets.append(keep.index(f.classes[t]))
                groups.append(f"{si}:{g}" if len(scans) > 1 else g)
                sources.append(si)
    return LabelledFiles(tuple(paths), np.asarray(targets, dtype=np.int64), tuple(groups), keep,
                         np.asarray(sources, dtype=np.int64), tuple(str(r) for r in roots))


#: The folder under a run folder that ``train --labels`` links its files into, one sub-folder per class.
LABELLED_VIEW = "labelled"
#: What that folder says about itself (a hidden file: the class-folder scan skips it); a folder without it is not replaced.
VIEW_RECORD = ".labels.json"


@dataclass(frozen=True)
class LabelledView:
    """A class-folder tree of links to the files a labels CSV names: what every part of training reads as a data folder."""

    path: Path
    per_class: dict[str, int]
    excluded: int
    groups_file: Path | None = None  # the --groups file with its paths as the tree spells them


def labelled_view(
    root: str | os.PathLike[str], labels_csv: str | os.PathLike[str], dest: str | os.PathLike[str],
    classes: Sequence[str] = (), group_map: Mapping[str, str] | None = None,
) -> LabelledView:
    """Link the files ``labels_csv`` names (``path,label``, paths relative to ``root``, as classify's ``--labels``; EXCLUDE
    rows skipped) into ``dest/LABEL/path``; ``classes`` (a model being fine-tuned) each get a folder, even when empty, and
    labels matching one of them in another case are spelt as it is.

    Why links in a class-folder tree: the run, ``export`` (which rebuilds the validation split from the run's data
    folder) and ``--init`` all read class folders; a tree that is one lets them read a lab's verified cells, wherever
    they lie under ``root``, with nothing else to know. ``group_map`` (``--groups``, paths relative to ``root``) is
    rewritten for the tree's paths. Every row that names no image file under ``root`` is named in one error.
    """
    from ..inference.truth import EXCLUDE, LabelsError, named, read_path_labels

    root, dest = Path(root), Path(dest)
    spelt = {c.upper(): c for c in classes}
    links: dict[str, tuple[int, str]] = {}  # path -> (line, label)
    bad, excluded = [], 0
    for r in read_path_labels(labels_csv, root):
        label = spelt.setdefault(r.label.upper(), r.label)
        if label.upper() == EXCLUDE:
            excluded += 1
        elif (why := _unusable(root, r.path)) or links.get(r.path, (0, label))[1] != label:
            bad.append(f"line {r.line}: {r.path!r} {why or f'is labelled twice ({links[r.path][1]!r} on line {links[r.path][0]})'}")
        else:
            links.setdefault(r.path, (r.line, label))
    if bad:
        raise LabelsError(f"{labels_csv}: {named(bad)}")
    _replace_view(dest, {"root": str(root.resolve()), "labels": str(Path(labels_csv).resolve()), "files": len(links), "excluded": excluded})
    for c in {*classes, *(lb for _, lb in links.values())} - {EXCLUDE}:
        (dest / c).mkdir(parents=True, exist_ok=True)
    for rel, (_, label) in links.items():
        (dest / label / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink((root / rel).resolve(), dest / label / rel)
    per_class = {c: sum(lb == c for _, lb in links.values()) for c in sorted({*classes, *(lb for _, lb in links.values())})}
    groups = _view_groups(dest, links, group_map) if group_map is not None else None
    return LabelledView(dest, per_class, excluded, groups)


def _unusable(root: Path, rel: str) -> str:
    """Why ``rel`` cannot be a training file ('' when it can)."""
    if ".." in Path(rel).parts or Path(rel).is_absolute():
        return "lies outside the data folder"
    if any(part.startswith(".") for part in Path(rel).parts):
        return "is hidden (a file or folder whose name starts with '.'), which training skips"
    if not is_image_name(rel):
        return "has no image file extension"
    return "" if (root / rel).is_file() else "is not a file under the data folder"


def _replace_view(dest: Path, record: dict) -> None:
    """An empty ``dest`` with its record; an earlier view is replaced, any other folder refused."""
    import json
    import shutil

    from ..inference.truth import LabelsError

    if dest.exists():
        if not (dest / VIEW_RECORD).is_file():
            raise LabelsError(f"{dest} exists and is not a folder train --labels made: give the run another folder")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / VIEW_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")


def _view_groups(dest: Path, links: Mapping[str, tuple[int, str]], group_map: Mapping[str, str]) -> Path:
    """The groups of the linked files, keyed by their paths in the tree (LABEL/path), as a ``path,group`` CSV in it."""
    out = dest / ".groups.csv"
    with open(out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "group"])
        w.writerows((f"{label}/{rel}", group_map[rel]) for rel, (_, label) in links.items() if rel in group_map)
    return out


def source_split(files: LabelledFiles, idx: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`group_split` within each data folder, over the files ``idx``: every folder gives its
    share of validation, by its own groups (a folder whose names carry no group: per file, stratified)."""
    src = files.source_of()[idx]
    targets = files.targets[idx]
    groups = np.asarray([files.groups[i] for i in idx])
    tr, va = [], []
    for s in np.unique(src):
        m = np.flatnonzero(src == s)
        t, v = group_split(targets[m], groups[m].tolist(), val_fraction, seed)
        tr.append(m[t])
        va.append(m[v])
    cat = (lambda a: np.sort(np.concatenate(a)) if a else np.zeros(0, np.int64))  # noqa: E731
    return cat(tr), cat(va)


def balance_weights(targets: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Sampling probability per file: every source draws the same share of an epoch, and within a
    source every class it has the same share: ``1 / (S * C_s * n_{s,c})``. Sums to 1.

    Why: a big lab's folder would otherwise teach the network that lab (its stain, its scale),
    and a lab's common class would crowd out its rare ones.
    """
    w = np.zeros(len(targets), dtype=np.float64)
    srcs = np.unique(sources)
    for s in srcs:
        in_s = sources == s
        cls = np.unique(targets[in_s])
        for c in cls:
            m = in_s & (targets == c)
            w[m] = 1.0 / (len(srcs) * len(cls) * m.sum())
    return w


def subsample(files: LabelledFiles, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``per_class`` random files of each class in each folder (0: all)."""
    if not per_class:
        return np.arange(len(files.paths))
    rng = np.random.default_rng(seed)
    src = files.source_of()
    picks = [rng.permutation(np.flatnonzero((files.targets == c) & (src == s)))[:per_class]
             for s in np.unique(src) for c in range(len(files.classes))]
    return np.sort(np.concatenate(picks))


#: The decoded frame's long side is at most this (pixels): 320 is the blood-cells fields' native width.
MAX_DECODE_SIDE = 320


def derived_size(paths: Sequence[str], limit: int = MAX_DECODE_SIDE, sample: int = 512) -> tuple[int, int]:
    """Decode size (height, width) from the training images: the median height and width of up to
    ``sample`` files (evenly spaced, header only), scaled down (never up) so the long side is at most
    ``limit``, each rounded to a multiple of 8. blood-cells' 240x320 fields give 240x320; pbc's
    360x363 crops give 320x320; a mix gives the size most of its files have.
    """
    if not paths:
        raise ValueError("no images to derive a decode size from")
    pick = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).astype(int))]
    sizes = []
    for p in pick:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except (OSError, UnidentifiedImageError):
            continue
    if not sizes:
        raise ValueError("none of the training images could be read to derive a decode size")
    w, h = (float(np.median([s[k] for s in sizes])) for k in (0, 1))
    f = min(1.0, limit / max(h, w))
    return max(8, int(round(h * f / 8)) * 8), max(8, int(round(w * f / 8)) * 8)


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
