"""Training on several data folders at once: class subsets, per-folder splits, per-folder balance, and
the decode size derived from the images. Real images (sample_data, and pbc/blood-cells when present)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, SHARED_DATA, needs_shared_data

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from wbc_batch.training.config import TrainConfig  # noqa: E402
from wbc_batch.training.data import balance_weights, derived_size, scan_sources, source_split, subsample  # noqa: E402

PBC = SHARED_DATA.parent / "pbc"


def _lab(root, classes: dict[str, int], prefix: str = ""):
    """A class-folder set of symlinks to real sample images: ``classes`` name -> count; file names
    get ``prefix`` (no prefix: blood-cells' ``_{SOURCE}_{ID}`` names, which carry a group)."""
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        src = sorted((SAMPLE / (cls if (SAMPLE / cls).is_dir() else "NEUTROPHIL")).glob("*.jpeg"))
        for i in range(n):
            p = src[i % len(src)]
            (root / cls / (f"{prefix}{i}.jpeg" if prefix else p.name)).symlink_to(p)
    return root


def test_one_folder_scans_exactly_as_before():
    a = scan_sources([SAMPLE])
    assert a.classes == ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL") and a.sources is None and a.roots == (str(SAMPLE),)
    assert a.groups[0].startswith("EOSINOPHIL/")


def test_several_folders_union_their_classes_and_keep_groups_apart(tmp_path):
    b = _lab(tmp_path / "b", {"LYMPHOCYTE": 3, "NEUTROPHIL": 2, "BASOPHIL": 2}, prefix="CELL_")
    f = scan_sources([SAMPLE, b])
    assert f.classes == ("BASOPHIL", "EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
    assert np.bincount(f.sources).tolist() == [40, 7]
    assert f.roots == (str(SAMPLE), str(b))
    assert {g.split(":")[0] for g in f.groups} == {"0", "1"}
    i = f.paths.index(str(b / "LYMPHOCYTE" / "CELL_1.jpeg"))
    assert f.targets[i] == 2 and f.groups[i] == "1:LYMPHOCYTE/CELL_1.jpeg"  # no group in the name: the file is its own


def test_classes_keeps_a_subset_and_names_missing_ones(tmp_path):
    b = _lab(tmp_path / "b", {"LYMPHOCYTE": 3, "NEUTROPHIL": 2, "BASOPHIL": 2}, prefix="CELL_")
    f = scan_sources([SAMPLE, b], classes=("NEUTROPHIL", "LYMPHOCYTE"))
    assert f.classes == ("LYMPHOCYTE", "NEUTROPHIL")
    assert np.bincount(f.sources).tolist() == [20, 5] and set(f.targets.tolist()) == {0, 1}
    with pytest.raises(ValueError, match=r"\['PLATELET'\] found in none"):
        scan_sources([SAMPLE, b], classes=("NEUTROPHIL", "PLATELET"))
    with pytest.raises(ValueError, match="at least two classes"):
        scan_sources([b], classes=("NEUTROPHIL",))


def test_balance_weights_give_each_source_and_each_class_within_it_an_equal_share():
    targets = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 2])
    sources = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    w = balance_weights(targets, sources)
    # source 0: classes 0 (3 files), 1 (1 file); source 1: classes 0 (1), 1 (4), 2 (1).
    expected = [1 / 12] * 3 + [1 / 4] + [1 / 6] + [1 / 24] * 4 + [1 / 6]
    assert np.allclose(w, expected, rtol=0, atol=1e-15) and abs(w.sum() - 1) < 1e-12


def test_split_is_per_folder_and_one_folder_splits_as_before(tmp_path):
    from wbc_batch.training.data import group_split

    one = scan_sources([SAMPLE])
    idx = np.arange(len(one.paths))
    assert all(np.array_equal(a, b) for a, b in zip(source_split(one, idx, 0.3, 0), group_split(one.targets, one.groups, 0.3, 0), strict=True))
    b = _lab(tmp_path / "b", {"LYMPHOCYTE": 10, "NEUTROPHIL": 10}, prefix="CELL_")
    f = scan_sources([SAMPLE, b], classes=("LYMPHOCYTE", "NEUTROPHIL"))
    tr, va = source_split(f, np.arange(len(f.paths)), 0.3, 0)
    assert not set(tr) & set(va) and len(tr) + len(va) == 40
    # The folder without groups holds out 30% of each class's files: 3 + 3.
    assert int((f.sources[va] == 1).sum()) == 6 and set(f.targets[va][f.sources[va] == 1].tolist()) == {0, 1}


def test_subsample_caps_each_class_in_each_folder(tmp_path):
    b = _lab(tmp_path / "b", {"LYMPHOCYTE": 10, "NEUTROPHIL": 10}, prefix="CELL_")
    f = scan_sources([SAMPLE, b], classes=("LYMPHOCYTE", "NEUTROPHIL"))
    idx = subsample(f, 4, seed=0)
    cells = [(int(s), int(t)) for s, t in zip(f.sources[idx], f.targets[idx], strict=True)]
    assert sorted(set(cells)) == [(0, 0), (0, 1), (1, 0), (1, 1)] and all(cells.count(c) == 4 for c in set(cells))
    assert np.array_equal(subsample(f, 4, seed=0), idx) and np.array_equal(subsample(f, 0, 0), np.arange(len(f.paths)))


def test_derived_decode_size_rule(tmp_path):
    from PIL import Image

    assert derived_size([str(p) for p in sorted(SAMPLE.glob("*/*.jpeg"))]) == (240, 320)  # blood-cells fields: kept
    sizes = {"a": (363, 360), "b": (363, 360), "c": (120, 120), "d": (100, 90)}  # (w, h): median w 241.5, h 240
    paths = []
    for name, wh in sizes.items():
        Image.new("RGB", wh, (200, 180, 190)).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    assert derived_size(paths[:2]) == (320, 320)  # 360x363 scaled by 320/363: 317.4 x 320 -> multiples of 8
    assert derived_size(paths[2:3]) == (120, 120)  # small crops are never upscaled
    assert derived_size(paths) == (240, 240)  # medians 240 and 241.5 -> 240, 240
    with pytest.raises(ValueError, match="no images"):
        derived_size([])


def test_two_folder_run_records_sources_and_samples_by_balance(tmp_path):
    from wbc_batch.inference.preprocess import PreprocessSpec
    from wbc_batch.training.loop import epoch_weights, load_data, train

    b = _lab(tmp_path / "b", {"LYMPHOCYTE": 6, "NEUTROPHIL": 2}, prefix="CELL_")
    cfg = TrainConfig([str(SAMPLE), str(b)], str(tmp_path / "run"), class_subset=("LYMPHOCYTE", "NEUTROPHIL"), crop=(96, 32),
                      epochs=1, batch_size=8, val_fraction=0.3, patience=0, workers=1, threads=1)
    data = load_data(cfg, PreprocessSpec(120, 160))
    w = epoch_weights(cfg, data)
    src, t = data.sources[data.train_idx], data.targets[data.train_idx]
    assert np.allclose(w, balance_weights(t, src)) and abs(w[src == 1].sum() - 0.5) < 1e-12
    assert abs(w[(src == 1) & (t == 1)].sum() - 0.25) < 1e-12
    assert epoch_weights(replace(cfg, source_balance=False), data) is None
    train(cfg, progress=False)
    rec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rec["size"] == [240, 320]  # derived from the images
    assert rec["sources"] == [{"path": str(SAMPLE), "files": 20, "per_class": {"LYMPHOCYTE": 10, "NEUTROPHIL": 10}},
                              {"path": str(b), "files": 8, "per_class": {"LYMPHOCYTE": 6, "NEUTROPHIL": 2}}]
    assert rec["classes"] == ["LYMPHOCYTE", "NEUTROPHIL"] and rec["keep_aspect"] and rec["crop_follow"] and rec["colour"] == "wide"
    assert rec["colour_norm"] == "background" and len(rec["background"]) == 3 and all(150 < v <= 255 for v in rec["background"])
    # export rebuilds the run's validation split across both folders (calibration, threshold)
    from wbc_batch.training.export import run_split

    train_set, val_set, _ = run_split(tmp_path / "run", rec["classes"])
    assert (len(train_set.paths), len(val_set.paths)) == (rec["n_train"], rec["n_val"])
    assert {str(b / "LYMPHOCYTE"), str(SAMPLE / "LYMPHOCYTE")} >= {str(Path(q).parent) for q in val_set.paths if "LYMPHOCYTE" in q}
    assert not set(train_set.paths) & set(val_set.paths) and any(str(b) in q for q in val_set.paths)


@needs_shared_data("pbc")
def test_blood_cells_and_pbc_derive_their_own_sizes():
    assert derived_size(scan_sources([SHARED_DATA / "TRAIN", PBC / "train"]).paths) == (240, 320)
    assert derived_size(scan_sources([PBC / "train"]).paths) == (320, 320)


def test_a_class_folder_whose_name_would_start_a_formula_is_refused_before_training(tmp_path):
    lab = _lab(tmp_path / "lab", {"EOSINOPHIL": 2, "=SUM(A1)": 2, "+B": 2})
    with pytest.raises(ValueError, match=r"a label may not start with = \+ - @ TAB or CR .*rename \['\+B', '=SUM\(A1\)'\]"):
        scan_sources([lab])


def test_loss_weights_keep_each_folders_classes_even_when_class_sets_differ():
    """blood-cells' 4 classes beside pbc's 8: the sampler already gives every class of a folder the same share of
    that folder's draws. Global class weights on top (n / (C * n_c) over the epoch) would weight pbc's own classes
    3x its shared ones, so pbc-looking cells would be taught IG three times as often as NEUTROPHIL."""
    from wbc_batch.training.loop import class_weights

    src = np.array([0] * 40 + [1] * 80)
    t = np.concatenate([np.repeat([0, 1, 2, 3], 10), np.repeat(np.arange(8), 10)])
    draws = balance_weights(t, src) * len(t)
    w = class_weights(t, 8, "balanced", draws)
    effective = {s: [draws[(src == s) & (t == c)].sum() * (1.0 if w is None else float(w[c])) for c in np.unique(t[src == s])]
                 for s in (0, 1)}
    for s, shares in effective.items():
        assert np.allclose(shares, shares[0]), (s, shares)
    one = class_weights(np.array([0] * 30 + [1] * 10), 2, "balanced", None)  # one folder, no sampler: weights even it out
    assert np.allclose(one.numpy(), [40 / 60, 40 / 20])
