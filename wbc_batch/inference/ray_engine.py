"""The Ray engine: the same classify run, with decoding and inference spread over a Ray cluster.

Only the *distribution* differs from the local engine (:class:`wbc_batch.inference.local_engine.LocalEngine`);
both implement :class:`wbc_batch.inference.engine.Engine`:

* the files are the ones :func:`wbc_batch.inference.discover.iter_images` lists, in the same order and
  with the same relative paths (discovery runs on the driver, the machine you type the command on);
* each batch is decoded and classified by :func:`wbc_batch.inference.engine.run_batch` (so by
  :func:`wbc_batch.inference.preprocess.load_image` and :meth:`wbc_batch.inference.model.Model.predict`) inside a
  Ray Data ``map_batches`` actor pool, one onnxruntime session per actor;
* the answers come back to the driver in input order and become rows with
  :func:`wbc_batch.inference.rows.to_predictions` and the truth function the orchestrator hands in,
  and :func:`wbc_batch.inference.orchestrator.run_classify` writes, resumes and summarises them
  exactly as for a local run.

The model file travels to the workers through Ray's object store (its bytes are ``ray.put``
once); the *images* do not: every worker opens the input paths itself, so they must be readable
at the same absolute path on every node (a shared or network filesystem, or the same copy).

Discovery is lazy; files are handed to Ray in windows of :attr:`RayEngine.window` files (one
Ray Data execution each) so the driver never lists millions of paths at once.

``ray`` is imported here only, and this module is imported only for ``--engine ray``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

import numpy as np

from ..errors import INSTALL, ExitCode, WbcBatchError
from .discover import InputFile
from .engine import RunnerOptions, available_cores, run_batch
from .isolation import Crashed, CrashIsolation, halves
from .metadata import ModelError
from .model import Model, load_model
from .rows import BatchResult, Prediction, TruthFn, to_predictions

RAY_HINT = f"--engine ray needs Ray: {INSTALL['ray']}"

try:  # the optional extra (pip install '.[ray]' in the checkout)
    import ray
except ImportError:  # pragma: no cover - exercised where ray is absent
    ray = None  # type: ignore[assignment]

#: Providers that need a GPU per actor.
GPU_PROVIDERS = ("cuda", "tensorrt", "CUDAExecutionProvider", "TensorrtExecutionProvider")


class RayEngineError(WbcBatchError):
    """The Ray engine cannot run or finish; the message says why (rows written so far are kept)."""

    exit_code = ExitCode.FAILURE


class RayUnavailable(RayEngineError):
    """Ray is not installed, or the cluster cannot be reached; the message says which."""


def require_ray() -> None:
    if ray is None:
        raise RayUnavailable(RAY_HINT)


def _loopback_only() -> None:
    """Make a private Ray listen on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray swaps a loopback node
    address for the machine's routable one, and its servers bind to the node address (or all
    interfaces). Ray keeps loopback when it believes it runs a single-machine setup (its
    Windows/macOS mode): ask for that, for this process and the Ray processes it starts.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported; looked up at each use
    except (ImportError, AttributeError):  # pragma: no cover - a Ray without that switch
        pass


def start_ray(address: str | None, options: RunnerOptions) -> float | None:
    """Join the cluster at ``address``, or start a private loopback Ray; None if Ray was already running.

    Returns the seconds ``ray.init`` took when this call started it (so the caller must stop it).
    """
    require_ray()
    if ray.is_initialized():
        return None
    t0 = time.perf_counter()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            _loopback_only()
            ray.init(
                address="local",  # never an existing cluster named by RAY_ADDRESS
                num_cpus=max(available_cores(), options.resolved_workers() * _cpus_per_actor(options)),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local instance"
        raise RayUnavailable(f"cannot start or join Ray ({where}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return time.perf_counter() - t0


def _cpus_per_actor(options: RunnerOptions) -> int:
    return options.threads if options.threads > 0 else 1


def _uses_gpu(options: RunnerOptions) -> bool:
    return options.provider in GPU_PROVIDERS or options.provider.lower() in GPU_PROVIDERS


def _n_actors(options: RunnerOptions) -> int:
    """--workers actors, else one per GPU (GPU providers) or per ``threads`` CPUs of the cluster."""
    if options.workers > 0:
        return options.workers
    res = ray.cluster_resources()
    if _uses_gpu(options):
        return max(1, int(res.get("GPU", 0)))
    return max(1, int(res.get("CPU", 1) // _cpus_per_actor(options)))


def _quiet_ordered_ray_data() -> None:
    """Batches back in input order; Ray Data's own bars and banners off (the run reports progress)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


class Predictor:
    """A Ray Data actor: one onnxruntime session, built from model bytes that came through Ray.

    ``__call__`` takes a batch ``{"idx", "path"}`` (paths as ``os.fsencode`` bytes) and returns per
    file its ``idx`` and what :meth:`BatchResult.padded` gives (the error as UTF-8 bytes): one row per
    file, whatever the worker computed for it, so Ray can cut and re-sequence the answers.
    """

    def __init__(self, model_ref: list, sha256: str, provider: str, threads: int) -> None:
        data = model_ref[0]
        if ray is not None and isinstance(data, ray.ObjectRef):
            data = ray.get(data)
        # load_model (and its metadata/IO checks) reads a file: give it a private copy of the bytes.
        tmp = tempfile.mkdtemp(prefix="wbc-batch-model-")
        try:
            path = os.path.join(tmp, "model.onnx")
            with open(path, "wb") as f:
                f.write(data)
            self.model: Model = load_model(path, provider=provider, threads=threads, spinning=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.model.sha256 != sha256:
            raise ModelError(f"the model bytes received by a Ray worker have sha256 {self.model.sha256[:12]}..., expected {sha256[:12]}...")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
        out = run_batch(self.model, paths).padded()
        out["error"] = np.array([e.encode("utf-8", "surrogateescape") for e in out["error"]], dtype=object)
        return {"idx": np.asarray(batch["idx"], dtype=np.int64), **out}


@dataclass
class RayEngine:
    """An :class:`~wbc_batch.inference.engine.Engine` that executes the batches on Ray Data actors.

    ``engine.batches(files, model, options, truth)`` yields lists of :class:`Prediction` in input order.

    ``address``: None starts a private Ray on this machine, bound to 127.0.0.1 (and stops it at the
    end); ``"auto"`` or ``host:port`` joins a running cluster. If Ray is already initialised in this
    process (a script, a test) that instance is used and left running.
    """

    address: str | None = None
    window: int = 50_000  # files per Ray Data execution
    max_restarts: int = 3  # per actor, when its process dies
    max_task_retries: int = 3  # per batch, on a restarted actor
    predictor_cls: type = Predictor  # tests swap in a Predictor that crashes once
    startup_s: float = field(default=0.0, init=False)  # seconds spent in ray.init (0 if it was running)
    actors: int = field(default=0, init=False)
    nodes: list[str] = field(default_factory=list, init=False)  # addresses of the live Ray nodes used
    _started: bool = field(default=False, init=False, repr=False)  # this engine started Ray and must stop it

    name = "ray"

    def info(self) -> dict[str, Any]:
        return {"name": "ray", "address": self.address or "local (127.0.0.1)", "actors": self.actors, "nodes": self.nodes}

    def _start(self, options: RunnerOptions) -> bool:
        """Connect to (or start) Ray; True when this call started it (and :meth:`close` will stop it)."""
        startup = start_ray(self.address, options)
        if startup is None:
            return False
        self.startup_s, self._started = startup, True
        return True

    def close(self) -> None:
        if self._started:
            self._started = False
            ray.shutdown()

    def batches(self, files: Iterable[InputFile], model: Model, options: RunnerOptions, truth: TruthFn) -> Generator[list[Prediction], None, None]:
        it = iter(files)
        first = next(it, None)
        if first is None:
            return  # nothing to do (e.g. a finished --resume): do not start Ray at all
        self._start(options)
        try:
            yield from self._run(chain([first], it), model, options, truth)
        finally:
            self.close()

    def _map_kwargs(self, model: Model, options: RunnerOptions) -> dict[str, Any]:
        """``map_batches`` arguments: the actor pool, its resources, the model (sent once), bounded retries."""
        model_ref = ray.put(model.data)  # the bytes the run loaded (not the file again): travels by Ray, once per run
        cpa = _cpus_per_actor(options)
        kwargs: dict[str, Any] = dict(
            fn_constructor_args=([model_ref], model.sha256, options.provider, cpa),
            batch_size=max(1, options.batch_size),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=cpa,
        )
        if _uses_gpu(options):
            kwargs["num_gpus"] = 1
        return kwargs

    def _run(self, files: Iterator[InputFile], model: Model, options: RunnerOptions, truth: TruthFn) -> Iterator[list[Prediction]]:
        import ray.data

        _quiet_ordered_ray_data()
        self.nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
        self.actors = _n_actors(options)
        map_kwargs = self._map_kwargs(model, options)
        batch_size = map_kwargs["batch_size"]
        # Bounded fault tolerance: a dead actor is restarted and its batch rerun, a few times
        # (Ray Data's own default is forever, which a file that always kills its decoder would turn
        # into a hang). Ray marks these pass-through arguments deprecated; without them, its default holds.
        retry_kwargs = dict(max_restarts=self.max_restarts, max_task_retries=self.max_task_retries)

        def run(window: Sequence[InputFile]) -> Iterator[list[Prediction]]:
            # Paths travel as bytes: POSIX names need not be UTF-8 (Arrow strings must be).
            items = [{"idx": i, "path": os.fsencode(f.path)} for i, f in enumerate(window)]
            ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                try:
                    ds = ds.map_batches(self.predictor_cls, **map_kwargs, **retry_kwargs)
                except TypeError:  # a Ray that no longer takes them
                    ds = ds.map_batches(self.predictor_cls, **map_kwargs)
            yield from _collect(ds, window, labels=model.labels, truth=truth, batch_size=batch_size)

        # A batch that fails after its retries is narrowed down by halves to the file that kills its actor every time.
        crashes = CrashIsolation(model.labels, truth, _give_up, narrow=halves)
        while window := list(islice(files, max(1, self.window))):
            yield from crashes.isolate(window, run)


def _give_up(f: InputFile, crashes: int, e: BaseException | None) -> RayEngineError:
    msg = str(e).strip().splitlines()
    return RayEngineError(
        f"Ray could not finish a batch after its retries, on {crashes} files in a row, each on its own (last: {f.rel}): "
        f"{type(e).__name__}: {msg[0][:300] if msg else ''}; that is a broken cluster, not bad files; rows before "
        "are in the CSV, rerun with --resume --retry-errors"
    )


def _collect(ds, window: Sequence[InputFile], *, labels: Sequence[str], truth: TruthFn, batch_size: int) -> Iterator[list[Prediction]]:
    """Rows of one window, in input order (results are re-sequenced by index, whatever Ray returns)."""
    pending: dict[int, dict[str, Any]] = {}  # per file, what Predictor returned for it
    nxt = 0
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    while True:
        try:
            out = next(batches, None)
        except ray.exceptions.RayError as e:
            # Retries are spent (an actor died on the same batch every time, or the cluster is gone).
            raise Crashed(nxt, e) from e
        if out is None:
            break
        for j, i in enumerate(out["idx"]):
            pending[int(i)] = {k: v[j] for k, v in out.items() if k != "idx"}
        start = nxt
        while nxt in pending:
            nxt += 1
        if nxt > start:
            yield from _rows(window, start, nxt, pending, labels, truth, batch_size)
    if nxt != len(window):  # cannot happen unless Ray dropped a block: never lose a row silently
        raise RuntimeError(f"Ray returned {nxt} of {len(window)} results in order; missing index {nxt}")


def _rows(window, start: int, stop: int, pending: dict, labels: Sequence[str], truth: TruthFn, batch_size: int) -> Iterator[list[Prediction]]:
    """The rows of files ``start:stop`` of ``window`` (their answers taken out of ``pending``), ``batch_size`` to a list."""
    for b0 in range(start, stop, batch_size):
        b1 = min(stop, b0 + batch_size)
        files = [pending.pop(i) for i in range(b0, b1)]
        cols = {k: np.stack([f[k] for f in files]) for k in files[0] if k != "error"}
        cols["error"] = np.array([bytes(f["error"]).decode("utf-8", "surrogateescape") for f in files], dtype=object)
        yield to_predictions(window[b0:b1], BatchResult.from_padded(cols), labels, truth)
