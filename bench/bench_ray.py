"""The Ray engine against the local one on the same cores: images/s, and what Ray's start costs.

Same files, same model, same --workers/--batch-size for both engines. Measured:

  cli local        ``python -m wbc_batch classify DATA --workers N`` wall clock (interpreter start included)
  cli ray          the same with ``--engine ray`` (starts and stops a private Ray on 127.0.0.1)
  ray start        ``import ray`` and ``ray.init`` of a private local Ray, in this process
  run local / ray  :func:`wbc_batch.inference.orchestrator.run_classify` in this process; for ray, with Ray already
                   running, so only actor start, model shipping and the work itself count;
                   also the time to the first rows and the steady rate after them
and that the two engines' CSVs hold the same rows (largest probability difference).

The model is ``export/wbc-default.onnx`` when it exists, else the tests' tiny colour model
(tests/conftest.py: build_color_model; decode-bound, so it shows the engines' overheads).

    PYTHONPATH=. .venv-ray/bin/python bench/bench_ray.py [--data DIR] [--model M.onnx] [--workers 2] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch.inference.local_engine import RunnerOptions, available_cores  # noqa: E402
from wbc_batch.inference.model import default_model_path  # noqa: E402
from wbc_batch.inference.orchestrator import ClassifyConfig, run_classify  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "blood-cells" / "TEST"


def _model(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), arg
    if default_model_path().is_file():
        return default_model_path(), f"default model ({default_model_path()})"
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_color_model

    p = build_color_model(tmp / "color.onnx")
    return p, "tests/conftest.py colour model (24x32 mean colour -> linear -> softmax; export/wbc-default.onnx absent)"


def _cli(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wbc_batch", "classify", *args, "-q", "--overwrite"], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.DictReader(f))


def _max_diff(a: Path, b: Path) -> tuple[bool, float]:
    ra, rb = _rows(a), _rows(b)
    same = [(r["path"], r["label"], r["status"], r["error"]) for r in ra] == [(r["path"], r["label"], r["status"], r["error"]) for r in rb]
    d = 0.0
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            if k.startswith("prob_") and x[k] and y[k]:
                d = max(d, abs(float(x[k]) - float(y[k])))
    return same, d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    model, model_desc = _model(args.model, tmp)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    common = [args.data, "-m", str(model), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    n = sum(1 for _ in Path(args.data).rglob("*") if _.is_file())
    print(f"data: {args.data} ({n} files); model: {model_desc}")
    print(f"cores visible: {available_cores()}; load average before: {os.getloadavg()[0]:.2f}; workers {args.workers}, batch {args.batch_size}")

    res: dict[str, float] = {}
    res["cli local"] = _cli([*common, "-o", str(tmp / "cli-local.csv")], env)
    res["cli ray"] = _cli([*common, "-o", str(tmp / "cli-ray.csv"), "--engine", "ray"], env)

    t0 = time.perf_counter()
    import ray  # noqa: F401

    t_import = time.perf_counter() - t0
    from wbc_batch.inference.ray_engine import RayEngine

    opts = RunnerOptions(workers=args.workers, batch_size=args.batch_size)
    engine = RayEngine()
    engine._start(opts)  # a private loopback Ray, timed by the engine
    t_init = engine.startup_s

    def run(name: str, eng) -> None:
        cfg = ClassifyConfig(inputs=[args.data], output=str(tmp / f"run-{name}.csv"), model=str(model), runner=opts, progress="none", overwrite=True)
        marks: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        s = run_classify(cfg, engine=eng, on_batch=lambda preds: marks.append((time.perf_counter(), len(preds))))
        res[f"run {name}"] = s.wall_s
        res[f"first rows {name}"] = marks[0][0] - t0
        # steady state: rows after the first batch over the time after it
        res[f"steady {name}"] = sum(k for _, k in marks[1:]) / max(marks[-1][0] - marks[0][0], 1e-9)

    try:
        run("ray", engine)  # Ray is running: the engine uses it and leaves it up
    finally:
        ray.shutdown()
    run("local", None)

    same, d = _max_diff(tmp / "run-local.csv", tmp / "run-ray.csv")
    same_cli, d_cli = _max_diff(tmp / "cli-local.csv", tmp / "cli-ray.csv")
    print()
    print(f"{'measure':<34} {'wall s':>8} {'images/s':>9}")
    for k in ("cli local", "cli ray", "run local", "run ray"):
        print(f"{k:<34} {res[k]:>8.2f} {n / res[k]:>9.1f}")
    for k in ("local", "ray"):
        print(f"{'run ' + k + ': steady state':<34} {'':>8} {res['steady ' + k]:>9.1f}")
        print(f"{'run ' + k + ': time to first rows':<34} {res['first rows ' + k]:>8.2f}")
    print(f"{'import ray':<34} {t_import:>8.2f}")
    print(f"{'ray.init (private, 127.0.0.1)':<34} {t_init:>8.2f}")
    print(f"{'ray overhead in cli (ray - local)':<34} {res['cli ray'] - res['cli local']:>8.2f}")
    print(f"same rows local vs ray: run {same} (max |dprob| {d:.2e}), cli {same_cli} (max |dprob| {d_cli:.2e})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
