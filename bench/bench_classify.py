"""Throughput and memory of classify against its ceiling and the usual pipelines (not run in CI).

One run, same files, same cores. Rates in images/s:
  D      decode + resize only (wbc_batch.inference.preprocess.load_image, the classify path), 1 and N processes
  M      network only: onnxruntime on pre-decoded uint8 batches (best of one N-thread session and
         N single-thread sessions in N processes, i.e. the most the cores give the network)
  bound  1 / (1/D_N + 1/M_N): the best any runner can do on these cores
  classify (CLI, start-up included) with --workers 1..N; naive loop; torch DataLoader pipeline
Peak RSS is sampled over the whole process tree (/proc), every 20 ms.

  python bench/bench_classify.py --models export/wbc-default.onnx[:RUN_DIR] ... [--tree 10000] [--big 100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch.inference.discover import iter_images  # noqa: E402
from wbc_batch.inference.local_engine import available_cores  # noqa: E402
from wbc_batch.inference.model import load_model  # noqa: E402
from wbc_batch.inference.model import network_rate as model_network_rate  # noqa: E402
from wbc_batch.inference.preprocess import PreprocessSpec, load_image  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "blood-cells" / "TEST"


# -- memory sampling over a process tree ---------------------------------------------------
def _tree_rss_kib(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_measured(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak tree RSS (MiB) and peak main-process RSS (MiB) of a command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = peak_main = 0

    def sample() -> None:
        nonlocal peak, peak_main
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kib(proc.pid))
            peak_main = max(peak_main, _tree_rss_kib_single(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {err.decode()[-800:]}")
    return wall, peak / 1024, peak_main / 1024


def _tree_rss_kib_single(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


# -- trees of N files built from the data set by links -------------------------------------
def build_tree(src: Path, n: int, dst: Path) -> int:
    """``dst`` holding exactly ``n`` image paths, each a file link into ``src``.

    File links, not folder links: discovery walks each real folder once, so linked copies of a
    folder would add no file.
    """
    src = src.resolve()
    files = [Path(f.path).resolve() for f in iter_images([src])]
    for j in range(n):
        f = files[j % len(files)]
        rel = f.relative_to(src)
        part = dst / f"copy{j // len(files):04d}" / rel.parent
        part.mkdir(parents=True, exist_ok=True)
        os.symlink(f, part / rel.name)
    return n


# -- D: decode + resize ---------------------------------------------------------------------
def _decode_chunk(args: tuple[list[str], PreprocessSpec]) -> int:
    paths, spec = args
    for p in paths:
        load_image(p, spec)
    return len(paths)


def decode_rate(paths: list[str], spec: PreprocessSpec, procs: int) -> float:
    chunks = [(paths[i : i + 64], spec) for i in range(0, len(paths), 64)]
    if procs <= 1:
        t = time.perf_counter()
        for c in chunks:
            _decode_chunk(c)
        return len(paths) / (time.perf_counter() - t)
    with ProcessPoolExecutor(procs) as ex:
        list(ex.map(_decode_chunk, chunks[:procs]))  # start the workers before timing
        t = time.perf_counter()
        n = sum(ex.map(_decode_chunk, chunks))
        return n / (time.perf_counter() - t)


# -- M: network only ------------------------------------------------------------------------
def _net_proc(args: tuple[str, np.ndarray, int]) -> float:
    path, images, batch = args
    return len(images) / model_network_rate(load_model(path, threads=1, spinning=False), images, batch)


def network_rate(path: str, images: np.ndarray, cores: int, batch: int = 32) -> tuple[float, float]:
    """(one session with ``cores`` threads, ``cores`` single-thread sessions in parallel processes)."""
    one = model_network_rate(load_model(path, threads=cores), images, batch)
    with ProcessPoolExecutor(cores) as ex:
        parts = np.array_split(images, cores)
        secs = list(ex.map(_net_proc, [(path, p, batch) for p in parts]))
    multi = len(images) / max(secs)
    return one, multi


# -- baselines ------------------------------------------------------------------------------
def naive_rate(path: str, files: list[str], spec: PreprocessSpec) -> float:
    """What people write first: PIL open + resize + one session.run per image."""
    import onnxruntime as ort
    from PIL import Image

    md = load_model(path, threads=1).metadata
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    for f in files:
        im = Image.open(f).convert("RGB").resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        sess.run(None, {md.input_name: np.asarray(im)[None]})
    return len(files) / (time.perf_counter() - t)


def torch_rate(run_dir: str, data: Path, cores: int, batch: int = 32) -> float:
    """torchvision ImageFolder + DataLoader(num_workers=cores) + the same network in eval mode."""
    import torch
    from torchvision import datasets, transforms

    from wbc_batch.training.export import load_run

    model, record, _ = load_run(run_dir)
    h, w = record.size
    tf = transforms.Compose([transforms.Resize((h, w)), transforms.PILToTensor()])
    ds = datasets.ImageFolder(str(data), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cores)
    n = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in dl:
            model(x.permute(0, 2, 3, 1).contiguous())
            n += len(x)
    return n / (time.perf_counter() - t)


def classify_cmd(model: str, inputs: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "wbc_batch", "classify", str(inputs), "-m", model, "-o", str(out), "--workers", str(workers), "--overwrite", "-q"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", nargs="+", required=True, help="MODEL.onnx[:RUN_DIR] (RUN_DIR enables the torch pipeline)")
    ap.add_argument("--tree", type=int, default=10000, help="files in the tree classify is timed on")
    ap.add_argument("--big", type=int, default=0, help="also classify a tree of this many files (memory check)")
    ap.add_argument("--workers", type=int, default=available_cores())
    ap.add_argument("--naive-files", type=int, default=500)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    n = args.workers
    files = [f.path for f in iter_images([args.data])]
    tmp = Path(tempfile.mkdtemp(prefix="wbc-bench-"))
    rows: list[tuple[str, str, float, float | None, str]] = []
    try:
        tree = tmp / "tree"
        build_tree(args.data, args.tree, tree)
        print(f"data: {args.data} ({len(files)} files); tree: {args.tree} files; cores: {n}", flush=True)
        for spec_model in args.models:
            path, _, run_dir = spec_model.partition(":")
            md = load_model(path, threads=1).metadata
            spec = md.preprocess
            name = f"{md.name} ({md.arch}, {md.height}x{md.width})"
            d1 = decode_rate(files, spec, 1)
            dn = decode_rate(files, spec, n)
            images = np.stack([load_image(f, spec) for f in files[:1024]])
            m_one, m_multi = network_rate(path, images, n)
            mn = max(m_one, m_multi)
            bound = 1 / (1 / dn + 1 / mn)
            rows += [
                (name, "D decode+resize, 1 process", d1, None, ""),
                (name, f"D decode+resize, {n} processes", dn, None, ""),
                (name, f"M network, 1 session x {n} threads", m_one, None, ""),
                (name, f"M network, {n} sessions x 1 thread", m_multi, None, ""),
                (name, "bound 1/(1/D+1/M)", bound, 1.0, ""),
            ]
            print(f"{name}: D1 {d1:.0f}  D{n} {dn:.0f}  M {m_one:.0f}/{m_multi:.0f}  bound {bound:.0f}", flush=True)
            for w in range(1, n + 1):
                wall, rss, rss_main = run_measured(classify_cmd(path, tree, tmp / "p.csv", w))
                rate = args.tree / wall
                rows.append((name, f"classify CLI --workers {w} ({args.tree} files, wall incl. start-up)", rate, rate / bound, f"peak RSS {rss:.0f} MiB (main {rss_main:.0f})"))
                print(rows[-1], flush=True)
            nv = naive_rate(path, files[: args.naive_files], spec)
            rows.append((name, "naive: PIL + resize + session.run per image", nv, nv / bound, ""))
            if run_dir and not args.skip_torch:
                tr = torch_rate(run_dir, args.data, n)
                rows.append((name, f"torch: ImageFolder + DataLoader(num_workers={n}) + eval", tr, tr / bound, "TEST set"))
            print(rows[-1], flush=True)
        if args.big:
            path = args.models[0].partition(":")[0]
            big = tmp / "big"
            build_tree(args.data, args.big, big)
            small = tmp / "small"
            build_tree(args.data, args.tree, small)
            for _label, d, cnt in (("small", small, args.tree), ("big", big, args.big)):
                wall, rss, rss_main = run_measured(classify_cmd(path, d, tmp / "m.csv", n))
                rows.append(("memory", f"classify {cnt} files, --workers {n}", cnt / wall, None, f"peak RSS tree {rss:.0f} MiB, main {rss_main:.0f} MiB"))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| model | measurement | images/s | of bound | note |\n|---|---|---:|---:|---|")
    for name, what, rate, ratio, note in rows:
        print(f"| {name} | {what} | {rate:.1f} | {'' if ratio is None else f'{ratio:.2f}'} | {note} |")


if __name__ == "__main__":
    main()
