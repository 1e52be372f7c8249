"""Classify throughput per onnxruntime execution provider (cpu, cuda, tensorrt) on one folder.

For a session with a GPU: `pip install onnxruntime-gpu` (instead of onnxruntime), then
  python bench/bench_provider.py --data ../shared/data/blood-cells/TEST [--model export/wbc-default.onnx]
Prints, per available provider: network-only images/s on pre-decoded batches (batch 32 and 256)
and the whole classify run (decode + inference, --workers N) with its agreement with the CPU labels.
Providers that onnxruntime does not offer here are listed as skipped, not failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch.inference.discover import iter_images  # noqa: E402
from wbc_batch.inference.local_engine import RunnerOptions, available_cores  # noqa: E402
from wbc_batch.inference.metadata import ModelError  # noqa: E402
from wbc_batch.inference.model import default_model_path, load_model, network_rate  # noqa: E402
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify  # noqa: E402
from wbc_batch.inference.preprocess import load_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "blood-cells" / "TEST")
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--providers", nargs="+", default=["cpu", "cuda", "tensorrt"])
    ap.add_argument("--workers", type=int, default=available_cores())
    args = ap.parse_args()
    files = [f.path for f in iter_images([args.data])]
    spec = load_model(args.model, threads=1).metadata.preprocess
    images = np.stack([load_image(f, spec) for f in files[:2048]])
    cpu_labels = None
    print(f"{len(files)} files, model {args.model}")
    for prov in args.providers:
        try:
            m = load_model(args.model, provider=prov)
        except ModelError as e:
            print(f"{prov}: skipped ({e})")
            continue
        rates = {bs: network_rate(m, images, bs) for bs in (32, 256)}
        with tempfile.TemporaryDirectory() as td:
            labels: list[str] = []
            cfg = ClassifyConfig(inputs=[str(args.data)], output=f"{td}/p.csv", model=args.model, progress="none",
                                 runner=RunnerOptions(workers=args.workers if prov == "cpu" else 1, batch_size=256 if prov != "cpu" else 32, provider=prov))
            s = run_classify(cfg, on_batch=lambda preds, out=labels: out.extend(p.label for p in preds))
        if prov == "cpu":
            cpu_labels = labels
        agree = np.mean([a == b for a, b in zip(labels, cpu_labels, strict=True)]) if cpu_labels else float("nan")
        print(f"{prov}: providers {m.providers}; network {rates[32]:.0f} img/s (batch 32), {rates[256]:.0f} (batch 256); "
              f"classify {s.images_per_s:.0f} img/s ({s.files} files, {s.wall_s:.1f}s); label agreement with cpu {agree:.4f}")


if __name__ == "__main__":
    main()
