"""The orchestration of a classify run: which files, true labels, output safety, --resume, progress, summary.

This is what ``wbc-batch classify`` does; it is a function so that scripts get the same
behaviour without the CLI. It decides *what* a run does and hands the batches to an
:class:`~wbc_batch.inference.engine.Engine`, which only decides *where* they execute (the local
process pool, or Ray).
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import ExitCode, UsageError, WbcBatchError
from .discover import InputFile, common_root, iter_images
from .engine import Engine, RunnerOptions
from .local_engine import LocalEngine
from .model import Model, load_model
from .output_guard import OutputLock, output_lock, refuse_input_as_output
from .predictions import (
    ExistingRun,
    OutputError,
    PredictionWriter,
    Schema,
    drop_rows,
    read_sidecar,
    scan_existing,
    sidecar_path,
    truncate_torn_tail,
    write_sidecar,
)
from .rows import STATUS_OK, Prediction, TruthFn, domain_warning
from .signals import StopState, stop_on_signals
from .truth import read_labels_csv, truth_function


class NoImagesError(WbcBatchError):
    """The run found no image under its inputs, or could read none of them."""

    exit_code = ExitCode.NO_IMAGES


@dataclass
class ClassifyConfig:
    inputs: Sequence[str]
    output: str = "predictions.csv"
    model: str | None = None
    runner: RunnerOptions = field(default_factory=RunnerOptions)
    resume: bool = False
    overwrite: bool = False
    retry_errors: bool = False  # with resume: redo the files whose rows are errors (their rows are replaced)
    labels_csv: str | None = None
    progress: str = "auto"  # auto | bar | log | none
    log_every_s: float = 10.0

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: --resume continues OUTPUT, --overwrite replaces it; give one")
        if self.retry_errors and not self.resume:
            raise UsageError("--retry-errors only applies with --resume (it redoes the error rows of OUTPUT)")


@dataclass
class RunSummary:
    output: str
    files: int = 0  # rows in the CSV at the end
    ok: int = 0
    errors: int = 0
    resumed: int = 0  # rows already there when --resume started
    processed: int = 0  # rows written by this run
    wall_s: float = 0.0
    images_per_s: float = 0.0
    interrupted: bool = False
    signal: int = 0  # the signal that interrupted the run (SIGINT, SIGTERM), 0 if none
    stale: int = 0  # rows dropped on resume because their files are no longer under the inputs
    model_sha256: str = ""
    labels: list[str] = field(default_factory=list)  # the model's, in its order
    #: Rows with a true label, whole CSV (resumed rows too): rows true, columns predicted; empty without truth.
    confusion: list[list[int]] = field(default_factory=list)
    domain_checked: bool = False  # the model carries a domain check (the CSV has ood_score and in_domain)
    out_of_domain: int = 0  # classified rows flagged out of domain, whole CSV
    #: An interrupted run only: files under the inputs (rows already there included), so its scores read as
    #: 'n of N'; 0 when not known (the background count had not finished). Set after the sidecar is written.
    found: int = 0

    def domain_warning(self) -> str | None:
        """The warning for a run with many out-of-domain images (see rows.OUT_OF_DOMAIN_WARN_SHARE), else None."""
        return domain_warning(self.out_of_domain, self.ok) if self.domain_checked else None

    def line(self, scores: str = "") -> str:
        """One line for the terminal; ``scores`` (e.g. accuracy and macro-F1, worked out by the caller) goes after the counts."""
        s = (
            f"files {self.files}  ok {self.ok}  errors {self.errors}  {scores + '  ' if scores else ''}"
            f"{self.images_per_s:.1f} images/s  wall {self.wall_s:.1f}s"
        )
        if self.domain_checked:
            s += f"  out of domain {self.out_of_domain}"
        if self.resumed:
            s += f"  (resumed: {self.resumed} already done)"
        return s + f"  -> {self.output}"


def require_images(summary: RunSummary) -> None:
    """Raise :class:`NoImagesError` when a finished run classified nothing (no file, or every file an error)."""
    if summary.files == 0:
        raise NoImagesError("no image files found under the inputs")
    if summary.ok == 0:
        raise NoImagesError(f"none of the {summary.files} files could be read (see the error column of {summary.output})")


def model_identity(model: Model) -> dict:
    """The sidecar's ``model``: what --resume checks (sha256) and what a report shows (with the calibration and domain sections)."""
    trust = {k: model.metadata.extra[k] for k in ("calibration", "domain") if k in model.metadata.extra}
    return {
        "name": model.metadata.name,
        "path": str(model.path),
        "sha256": model.sha256,
        "labels": list(model.labels),
        "arch": model.metadata.arch,
        **({"trust": trust} if trust else {}),
    }


class _Progress:
    """tqdm on a terminal, a log line every few seconds otherwise, or nothing."""

    def __init__(self, mode: str, initial: int, log_every_s: float) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.log_every_s = mode, log_every_s
        self.count, self.errors, self.t0, self.last_log = 0, 0, time.perf_counter(), time.perf_counter()
        self.total: int | None = None
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(desc="classify", unit="img", initial=initial, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, n: int, errors: int) -> None:
        self.count += n
        self.errors += errors
        if self.bar is not None:
            self.bar.update(n)
            if errors:
                self.bar.set_postfix(errors=self.errors, refresh=False)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self.last_log >= self.log_every_s:
                self.last_log = now
                rate = self.count / max(now - self.t0, 1e-9)
                of = f" of {self.total}" if self.total is not None else ""
                print(f"wbc-batch: {self.count}{of} images this run, {self.errors} errors, {rate:.1f} images/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _count_in_background(inputs: Sequence[str], root: Path, skip: set[str], progress: _Progress) -> threading.Thread:
    """Count the files still to do (same walk, nothing kept) so the bar can show an ETA."""

    def count() -> None:
        n = sum(1 for f in iter_images(inputs, root) if f.rel not in skip)
        progress.set_total(n)

    t = threading.Thread(target=count, daemon=True, name="wbc-batch-count")
    t.start()
    return t


def _prepare_output(cfg: ClassifyConfig, model: Model, root: Path) -> ExistingRun:
    """Check the output for --resume/--overwrite; returns what is already there (nothing for a fresh run)."""
    out = Path(cfg.output)
    if not out.exists() or cfg.overwrite:
        return ExistingRun(set(), 0, 0, 0, 0)
    if not cfg.resume:
        raise OutputError(f"{out} exists: use --resume to continue that run, or --overwrite to replace it")
    side = read_sidecar(out)
    if side is None:
        raise OutputError(f"cannot resume: {sidecar_path(out)} (which names the model that wrote {out}) is missing")
    if side.get("model", {}).get("sha256") != model.sha256:
        raise OutputError(
            f"cannot resume: {out} was written by model {side.get('model', {}).get('name')!r} "
            f"(sha256 {str(side.get('model', {}).get('sha256'))[:12]}...), not by {model.path.name} "
            f"(sha256 {model.sha256[:12]}...)"
        )
    if side.get("root") and os.path.abspath(side["root"]) != str(root):
        raise OutputError(f"cannot resume: {out} was written for input root {side['root']}, not {root}")
    existing = _scan(out, model)
    if existing.torn_bytes:
        truncate_torn_tail(out, existing.good_bytes)
    if cfg.retry_errors and existing.errors:
        schema = _schema(model)
        _drop_rows_while_running(out, side, lambda rec: schema.status(rec) != STATUS_OK)  # --retry-errors: their files are classified again
        existing = _scan(out, model)
    return existing


def _drop_rows_while_running(out: Path, info: dict, drop: Callable[[list[str]], bool]) -> None:
    """Drop rows from the CSV, the sidecar saying ``running`` before the new CSV takes the old one's place.

    Why: a kill between the two writes must not leave a sidecar that calls the run finished with the
    counts of the rows before (so the final summary and end time go too, as in a run that has not ended);
    a rewrite that fails (a full disk) changes neither file.
    """
    running = {k: v for k, v in info.items() if k not in ("summary", "finished", "error")} | {"state": "running"}
    drop_rows(out, drop, before_replace=lambda: write_sidecar(out, running))


def _schema(model: Model) -> Schema:
    """The columns of the CSV ``model`` writes."""
    return Schema(tuple(model.labels), model.metadata.domain is not None)


def _scan(out: Path, model: Model) -> ExistingRun:
    return scan_existing(out, model.labels, model.metadata.domain is not None)


def _recount(summary: RunSummary, truth_pairs: Counter[tuple[str, str]], existing: ExistingRun) -> None:
    """The summary's whole-CSV counts from a scan of the CSV (after rows were dropped from it)."""
    summary.ok, summary.errors, summary.out_of_domain = existing.ok, existing.errors, existing.out_of_domain
    truth_pairs.clear()
    truth_pairs.update(existing.truth_pairs)


def _load_model(cfg: ClassifyConfig) -> Model:
    opts = cfg.runner
    in_process = opts.in_process  # else the session here only checks the model: the workers build their own
    return load_model(cfg.model, provider=opts.provider, threads=opts.session_threads() if not in_process else opts.threads)


def _run_info(cfg: ClassifyConfig, model: Model, root: Path, inputs: Sequence[str], engine: Engine) -> dict:
    """The sidecar's first state: what runs, on what, with which model."""
    return {
        "wbc_batch": __version__,
        "model": model_identity(model),
        "root": str(root),
        "inputs": [os.path.abspath(p) for p in inputs],
        "labels_csv": os.path.abspath(cfg.labels_csv) if cfg.labels_csv else None,
        "started": _now(),
        "options": asdict(cfg.runner),
        "engine": engine.info(),
        "state": "running",
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _count_rows(summary: RunSummary, truth_pairs: Counter[tuple[str, str]], preds: Sequence[Prediction]) -> int:
    """Add a batch to the summary and the (true, predicted) tally; returns its number of error rows."""
    n_ok = 0
    for p in preds:
        if p.status == STATUS_OK:
            n_ok += 1
            summary.out_of_domain += p.in_domain is False
            if p.true_label:
                truth_pairs[p.true_label, p.label] += 1
    summary.ok += n_ok
    summary.errors += len(preds) - n_ok
    summary.processed += len(preds)
    return len(preds) - n_ok


def _close_summary(summary: RunSummary, t0: float, truth_pairs: Counter[tuple[str, str]]) -> None:
    summary.files = summary.ok + summary.errors
    summary.wall_s = time.perf_counter() - t0
    summary.images_per_s = summary.processed / summary.wall_s if summary.wall_s > 0 else 0.0
    if truth_pairs:
        summary.confusion = [[truth_pairs[t, p] for p in summary.labels] for t in summary.labels]


def run_classify(
    cfg: ClassifyConfig,
    model: Model | None = None,
    on_batch: Callable[[list[Prediction]], None] | None = None,
    engine: Engine | None = None,
) -> RunSummary:
    """Classify ``cfg.inputs`` into ``cfg.output``. Raises ModelError/OutputError/LabelsError on unusable setups.

    ``engine`` (default: a :class:`LocalEngine`, processes on this machine) only executes the
    batches; output checks, --resume, true labels, the sidecar, progress and summary are decided here.

    One signal policy holds from the first step (see :mod:`.signals`): a SIGINT or SIGTERM before
    the output is touched (loading the model, the walk's first image, the checks) ends the run at
    once, the output and its sidecar as they were; one while the output is prepared and opened is
    taken by the run as its first event. Either way the summary says ``interrupted``.
    """
    engine = engine or LocalEngine()
    summary = RunSummary(output=str(cfg.output))
    with stop_on_signals() as stop:
        try:
            _classify_to_csv(cfg, model, on_batch, engine, summary, stop)
        except KeyboardInterrupt as e:  # only before the output was touched: from then on the run's loop takes it
            engine.close()
            summary.interrupted, summary.signal = True, getattr(e, "signum", 0) or int(signal.SIGINT)
    return summary


def _classify_to_csv(
    cfg: ClassifyConfig,
    model: Model | None,
    on_batch: Callable[[list[Prediction]], None] | None,
    engine: Engine,
    summary: RunSummary,
    stop: StopState,
) -> None:
    t0 = time.perf_counter()
    if model is None:
        model = _load_model(cfg)
    inputs = [os.fspath(p) for p in cfg.inputs]
    root = common_root(inputs)
    # The labels file is checked before the output is touched: a bad one changes nothing.
    table = read_labels_csv(cfg.labels_csv, root, model.labels) if cfg.labels_csv else None
    truth = truth_function(model.labels, table)
    summary.model_sha256, summary.labels, summary.domain_checked = model.sha256, list(model.labels), model.metadata.domain is not None
    if not any(True for _ in iter_images(inputs, root)):
        return  # no image at all: no CSV, no sidecar (and an existing output stays as it was)
    with output_lock(cfg.output) as lock:  # one run per output; the kernel drops it when this process ends
        if Path(cfg.output).is_dir():
            raise OutputError(f"output {cfg.output} is a directory; give a CSV file path")
        # Not even --overwrite may replace a file the run reads.
        refuse_input_as_output(cfg.output, inputs, root, model=model.path, labels=cfg.labels_csv)
        stop.hold()  # from the first change to the output to the first batch, one step: execute() takes a stop asked meanwhile
        existing = _prepare_output(cfg, model, root)
        done, truth_pairs = existing.done, existing.truth_pairs
        summary.resumed, summary.ok, summary.errors = len(done), existing.ok, existing.errors
        summary.out_of_domain = existing.out_of_domain
        info = _run_info(cfg, model, root, inputs, engine)
        write_sidecar(cfg.output, info)
        progress = _Progress(cfg.progress, 0, cfg.log_every_s)
        writer = _open_writer(cfg, model, info, lock)
        counter = _count_in_background(inputs, root, done, progress)
        seen: set[str] = set()  # the rows already there whose files the walk still finds
        files: Iterator[InputFile] = (f for f in iter_images(inputs, root) if not _already_done(f.rel, done, seen))
        run = _Run(cfg, engine, writer, progress, summary, truth_pairs, info, t0)
        run.execute(engine.batches(files, model, cfg.runner, truth), on_batch, stop)
        if run.state == "interrupted":
            summary.found = _files_found(counter, progress, len(done))
        if run.state == "finished" and len(seen) < len(done):
            _drop_stale_rows(run, model, done - seen)


def _files_found(counter: threading.Thread, progress: _Progress, done: int) -> int:
    """Files under the inputs, rows already there included, for an interrupted run's 'n of N'; 0 when the
    background count does not finish within a second (a huge tree: the summary then says n alone)."""
    counter.join(timeout=1.0)
    return done + progress.total if progress.total is not None else 0


def _open_writer(cfg: ClassifyConfig, model: Model, info: dict, lock: OutputLock) -> PredictionWriter:
    """The CSV writer, its file locked by inode (see OutputLock.cover); if the CSV cannot even be opened (a full disk, no permission) the sidecar says the run failed."""
    try:
        append = cfg.resume and not cfg.overwrite and Path(cfg.output).exists()
        writer = PredictionWriter(cfg.output, model.labels, append=append, domain=model.metadata.domain is not None)
        lock.cover()
        return writer
    except OutputError as e:
        info.update(state="failed", finished=_now(), error=str(e))
        try:
            write_sidecar(cfg.output, info)
        except OutputError:
            pass  # the CSV's own error is the one to report
        raise


def _already_done(rel: str, done: set[str], seen: set[str]) -> bool:
    if rel in done:
        seen.add(rel)
        return True
    return False


def _drop_stale_rows(run: _Run, model: Model, stale: set[str]) -> None:
    """Rows for files no longer under the inputs (deleted since that run) leave the CSV; the summary says how many."""
    out = Path(run.cfg.output)
    schema = _schema(model)
    _drop_rows_while_running(out, run.info, lambda rec: schema.path(rec) in stale)
    _recount(run.summary, run.truth_pairs, _scan(out, model))
    run.summary.stale = len(stale)
    run.summary.resumed -= len(stale)
    _close_summary(run.summary, run.t0, run.truth_pairs)
    run.info.update(summary=asdict(run.summary))
    write_sidecar(out, run.info)


@dataclass
class _Run:
    """The writing part of a run: batches to the CSV under one signal policy, and the sidecar's last word in every case."""

    cfg: ClassifyConfig
    engine: Engine
    writer: PredictionWriter
    progress: _Progress
    summary: RunSummary
    truth_pairs: Counter[tuple[str, str]]
    info: dict
    t0: float
    state: str = "running"

    def execute(
        self, batches: Generator[list[Prediction], None, None], on_batch: Callable[[list[Prediction]], None] | None, stop: StopState
    ) -> None:
        """Write every batch; the first SIGINT/SIGTERM stops (workers ended, whole rows kept), later ones are ignored.

        ``stop`` comes held (StopState.hold) by the start-up: a signal that arrived during it stops the run here, before the first batch.
        """
        error: BaseException | None = None
        try:
            stop.release()
            for preds in batches:
                with stop.critical():  # a batch is written and counted, or neither
                    self.writer.write(preds)
                    self.progress.update(len(preds), _count_rows(self.summary, self.truth_pairs, preds))
                if on_batch is not None:
                    on_batch(preds)
        except KeyboardInterrupt as e:
            self.summary.interrupted = True
            self.summary.signal = getattr(e, "signum", 0) or int(signal.SIGINT)
        except BaseException as e:
            error = e
        stop.stopping()  # from here on a signal is only counted: the cleanup runs to its end
        self._finish(batches, error)
        if error is not None:
            raise error

    def _finish(self, batches: Generator, error: BaseException | None) -> None:
        """End the workers, flush, and record how the run ended. A failure here is raised only when the run had none."""
        late: OutputError | None = None
        try:
            batches.close()  # stop the engine's workers now, not when the generator is collected
        finally:
            self.engine.close()
            self.progress.close()
        try:
            self.writer.close()
        except OutputError as e:
            late = e
        failure = error or late
        _close_summary(self.summary, self.t0, self.truth_pairs)
        self.state = "interrupted" if self.summary.interrupted else ("failed" if failure is not None else "finished")
        self.info.update(engine=self.engine.info(), state=self.state, finished=_now(), summary=asdict(self.summary))
        if failure is not None:
            self.info["error"] = str(failure) or type(failure).__name__
        try:
            write_sidecar(self.cfg.output, self.info)
        except OutputError as e:
            late = late or e
        if error is None and late is not None:
            raise late


def classify(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    model: Model | str | os.PathLike[str] | None = None,
    *,
    options: RunnerOptions = RunnerOptions(),
    truth: TruthFn | None = None,
    engine: Engine | None = None,
) -> Iterator[Prediction]:
    """Classify every image under ``inputs``; yields one :class:`Prediction` per file, in order.

    ``inputs`` is a list of folders and files, or a single one. ``model`` is a loaded
    :class:`Model`, a path, or None for the shipped default model. Paths in the results are
    relative to the inputs' common root; true labels come from ``truth`` (default: the
    class-named parent folder). ``engine`` executes the batches (default: a :class:`LocalEngine`,
    processes on this machine; a :class:`~wbc_batch.inference.ray_engine.RayEngine` spreads them over
    Ray) and is closed at the end. Nothing is written: :func:`run_classify` is the run to a CSV.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a bare "folder" would otherwise be walked letter by letter
    inputs = list(inputs)
    if not isinstance(model, Model):
        model = load_model(model, provider=options.provider, threads=options.session_threads())
    files = iter_images(inputs, common_root(inputs))
    engine = engine or LocalEngine()
    batches = engine.batches(files, model, options, truth or truth_function(model.labels))
    try:
        for batch in batches:
            yield from batch
    finally:
        batches.close()
        engine.close()
