"""Network-only rate M of several models in one run (not run in CI): is a new model as fast as the one it replaces?

The same decoded TEST images go to every model; rounds alternate between the models (A B A B ...) so
that this shared host's speed drift hits each alike; the table gives each model's median over its
rounds and its ratio to the first model. M is the best of one N-thread session and N single-thread
sessions in N processes (bench_classify's definition), on pre-decoded uint8 batches.

  python bench/bench_network.py export/wbc-v1.onnx export/wbc-default.onnx [--images 480] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_classify import DEFAULT_DATA, network_rate  # noqa: E402

from wbc_batch.inference.discover import iter_images  # noqa: E402
from wbc_batch.inference.local_engine import available_cores  # noqa: E402
from wbc_batch.inference.model import load_model  # noqa: E402
from wbc_batch.inference.preprocess import load_image  # noqa: E402


def decoded(model_path: str, files: list[Path]) -> np.ndarray:
    spec = load_model(model_path, threads=1).metadata.preprocess
    return np.stack([load_image(f, spec) for f in files])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cores", type=int, default=available_cores())
    a = ap.parse_args()
    files = [f.path for f in iter_images([a.data], a.data)]
    files = [files[i] for i in np.linspace(0, len(files) - 1, a.images).astype(int)]
    images = {m: decoded(m, files) for m in a.models}
    rates: dict[str, list[float]] = {m: [] for m in a.models}
    for r in range(a.rounds):
        for m in a.models:
            rates[m].append(max(network_rate(m, images[m], a.cores)))
            print(f"round {r + 1}: {m} {rates[m][-1]:.0f} img/s", file=sys.stderr)
    base = statistics.median(rates[a.models[0]])
    print(f"| model | M, img/s (median of {a.rounds}, {a.cores} cores, {a.images} TEST images) | rounds | vs first |")
    print("|---|---:|---|---:|")
    for m in a.models:
        med = statistics.median(rates[m])
        print(f"| {m} | {med:.0f} | {', '.join(f'{v:.0f}' for v in rates[m])} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
