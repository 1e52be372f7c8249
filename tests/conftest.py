"""Shared fixtures: small valid ONNX models built with onnx.helper (no torch), real images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
SHARED_DATA = ROOT.parent / "shared" / "data" / "blood-cells"
LABELS = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")


def build_color_model(
    path: Path,
    *,
    labels=LABELS,
    height: int = 24,
    width: int = 32,
    metadata: dict | None | str = "default",
    input_shape=None,
    opset: int = 18,
) -> Path:
    """A real (tiny) classifier: uint8 NHWC -> mean colour -> linear -> softmax.

    Its output depends on the image content, so tests can check exact probabilities
    against a numpy reimplementation (:func:`color_model_reference`).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from wbc_batch.inference.metadata import ModelMetadata

    c = len(labels)
    w, b = _color_weights(c)
    shape = input_shape or ["N", height, width, 3]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["xf", "axes"], ["m"], keepdims=0),
        helper.make_node("Gemm", ["m", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "color",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", c])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if metadata == "default":
        md = ModelMetadata(labels=tuple(labels), height=height, width=width, name="color-test", arch="mean-colour")
        props = md.to_props()
    elif metadata is None:
        props = {}
    elif isinstance(metadata, str):
        props = {"wbc_batch": metadata}
    else:
        props = {"wbc_batch": json.dumps(metadata)}
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _color_weights(c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    return rng.normal(0, 0.02, size=(3, c)).astype(np.float32), rng.normal(0, 0.5, size=c).astype(np.float32)


def color_model_reference(batch: np.ndarray, c: int = 4) -> np.ndarray:
    """What the colour model computes, in numpy."""
    w, b = _color_weights(c)
    z = batch.astype(np.float32).mean(axis=(1, 2)) @ w + b
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture(scope="session")
def color_model(tmp_path_factory) -> Path:
    return build_color_model(tmp_path_factory.mktemp("models") / "color.onnx")


#: The trust model's domain threshold: the 0.9 quantile of sample_data's 40 scores, so 4 of them lie above it.
TRUST_OUT_OF_DOMAIN = 4


@pytest.fixture(scope="session")
def trust_model(tmp_path_factory) -> Path:
    """The colour model with calibration (temperature) and a domain check (ood_score) fitted on sample_data/.

    At the fields' own 240x320 (not a thumbnail) every sample image shows its nucleus, so the domain
    check's nucleus term raises none of them: 4 of the 40 lie above the 0.9-quantile threshold.
    """
    from wbc_batch.modelfile.calibrate import calibrate_model

    d = tmp_path_factory.mktemp("trust")
    color = build_color_model(d / "color.onnx", height=240, width=320)
    calibrate_model(color, SAMPLE, d / "trust.onnx", calibration_dir=SAMPLE, quantile=0.9)
    return d / "trust.onnx"


def trust_reference(model_path: Path, paths) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and ood scores of ``paths`` straight from onnxruntime (no wbc-batch inference code)."""
    import onnxruntime as ort

    from wbc_batch.inference.preprocess import PreprocessSpec, load_image

    x = np.stack([load_image(p, PreprocessSpec(240, 320)) for p in paths])
    probs, score = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(["probabilities", "ood_score"], {"image": x})
    return probs, score


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A private copy of sample_data/ (40 real images in class folders)."""
    dst = tmp_path / "in"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns("README*"))
    return dst


def sample_images() -> list[Path]:
    return sorted(p for p in SAMPLE.rglob("*.jpeg"))


#: The data sets some tests read beside the checkout (never copied into it), and how to get each.
SHARED_SETS = {
    "blood-cells": "Paul Mooney's Kaggle set 'blood-cells' (dataset2-master: TRAIN/ and TEST/ of class folders)",
    "pbc": "the PBC set's class folders (Acevedo et al. 2020, doi:10.17632/snkd93bnjr.1) as train/ and test/",
}


def needs_shared_data(name: str = "blood-cells"):
    """Skip where the data set ``name`` is not at ../shared/data/NAME; the reason says how to get it there."""
    where = SHARED_DATA.parent / name
    return pytest.mark.skipif(not where.is_dir(), reason=f"{where} not present: to run this test, put {SHARED_SETS[name]} at {where}")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


CHROMIUM = Path("/usr/bin/chromium")


def needs_chromium():
    """Skip where headless chromium is absent; the reason says how to install it."""
    return pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed: to run this test, apt-get install chromium "
                                                           "(what .ci/run does), or put a chromium at that path")


def dump_dom(html: Path, profile: Path) -> str:
    """The DOM of ``html`` after headless chromium loaded it offline (flags: no network, no first-run work)."""
    import subprocess

    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--dump-dom", html.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout



class _Payload:
    """Unpickling this runs ``touch <marker>``: the shape of a weights file that carries code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def pickle_payload_run(run: Path, marker: Path) -> Path:
    """A run folder (a valid config.json) whose best.pt, if it were unpickled, would create ``marker``."""
    import torch

    from wbc_batch.training.config import TrainConfig
    from wbc_batch.training.record import RunRecord

    run.mkdir(parents=True)
    cfg = TrainConfig(str(SAMPLE), str(run), arch="wbc-net", size=(48, 64), crop=(0, 0), epochs=1, device="cpu")
    spec = {"height": 48, "width": 64, "resize": "bilinear", "jpeg_draft": True, "max_pixels": 89478485}
    RunRecord(cfg, LABELS, spec, 30, 10, False, [], "cpu", torch.__version__, best_epoch=1, last_epoch=1).write(run)
    torch.save({"head.weight": _Payload(marker)}, run / "best.pt")
    return run
