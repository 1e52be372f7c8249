"""The shipped model embeds elsewhere: a Node.js program (onnxruntime-node) reads the labels
and input contract from the model file and classifies sample_data/ like Python does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE

from wbc_batch import RunnerOptions, classify
from wbc_batch.inference.model import default_model_path, read_metadata

NODE_DIR = Path(__file__).parent / "node"
pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="node/npm not installed"),
    pytest.mark.skipif(not default_model_path().is_file(), reason="shipped model export/wbc-default.onnx missing"),
]


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        r = subprocess.run(
            ["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", "--no-package-lock"],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=600,
        )
        if r.returncode != 0:
            pytest.skip(f"npm install failed (no registry?): {r.stderr[-500:]}")
    return NODE_DIR / "node_modules"


def test_node_reads_labels_from_model_and_matches_python(node_modules):
    model = default_model_path()
    r = subprocess.run(["node", str(NODE_DIR / "classify.mjs"), str(model), str(SAMPLE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    py = list(classify([SAMPLE], model, options=RunnerOptions(workers=1)))
    assert out["labels"] == list(read_metadata(model).labels) == ["BASOPHIL", "EOSINOPHIL", "ERYTHROBLAST", "IG", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL", "PLATELET"]
    node = {p["path"]: p for p in out["predictions"]}
    assert sorted(node) == sorted(p.path for p in py) and len(node) == 40
    assert {p.path: p.label for p in py} == {k: v["label"] for k, v in node.items()}
    # Decoders differ (jpeg-js full decode vs Pillow's draft mode), so probabilities agree closely, not exactly: the
    # 8-class default (efficientnet-lite0, temperature 0.56) moves by up to 0.104 on these 40 images, labels unchanged.
    diff = max(np.abs(np.asarray(node[p.path]["probabilities"]) - np.asarray(p.probabilities)).max() for p in py)
    assert diff < 0.15


def test_node_keeps_the_aspect_ratio_like_python(node_modules, tmp_path):
    """A keep_aspect model on square crops: Node pads like Python (a stretch would change the mean colour a lot)."""
    from conftest import build_color_model
    from PIL import Image

    from wbc_batch.inference.metadata import ModelMetadata

    md = ModelMetadata(labels=("A", "B", "C", "D"), height=24, width=32, keep_aspect=True, name="aspect")
    model = build_color_model(tmp_path / "aspect.onnx", height=24, width=32, metadata=md.to_json_dict())
    images = tmp_path / "img"
    images.mkdir()
    for p in sorted(SAMPLE.glob("*/*.jpeg"))[:6]:
        Image.open(p).crop((100, 60, 220, 180)).save(images / p.name, quality=95)
    r = subprocess.run(["node", str(NODE_DIR / "classify.mjs"), str(model), str(images)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    node = {p["path"]: np.asarray(p["probabilities"]) for p in json.loads(r.stdout)["predictions"]}
    py = {p.path: np.asarray(p.probabilities) for p in classify([images], model, options=RunnerOptions(workers=1))}
    assert sorted(node) == sorted(py) and len(py) == 6
    assert max(np.abs(node[k] - py[k]).max() for k in py) < 0.01
