"""``wbc-batch``: thin click wrappers around the library functions."""

from __future__ import annotations

import json
import signal
import sys

import click

from .. import __version__
from ..errors import ExitCode, UsageError, WbcBatchError
from ..inference.engine import RunnerOptions
from ..inference.orchestrator import ClassifyConfig, RunSummary, require_images, run_classify


class _Main(click.Group):
    """The command group: every :class:`WbcBatchError` a command raises becomes one message and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WbcBatchError as e:
            click.echo(f"wbc-batch: error: {e}", err=True)
            ctx.exit(int(e.exit_code))


def _given(**options):
    """The options the user gave (click passes None for the others), so the config dataclass's default applies."""
    return {k: v for k, v in options.items() if v is not None}


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wbc-batch")
def main() -> None:
    """Classify blood cells in microscope images (the shipped model: 8 classes, BASOPHIL to PLATELET).

    Train a CNN on labelled folders, export it to ONNX, classify whole folders with
    onnxruntime, and report accuracy, F1 and the confusion matrix.
    """


def _ray_engine(address: str | None):
    try:
        from ..inference.ray_engine import RayEngine, require_ray

        require_ray()
    except Exception as e:  # noqa: BLE001 - a missing or broken ray install is a usage problem, said plainly
        raise WbcBatchError(str(e), exit_code=ExitCode.USAGE) from e
    return RayEngine(address=address)


def _review_options(f):
    """--review-share and --target-accuracy: how many of the riskiest predictions the report's review queue holds."""
    f = click.option("--target-accuracy", type=click.FloatRange(0, 1), default=None,
                     help="Review queue: the smallest share of the riskiest predictions whose removal leaves the accepted ones at this "
                          "accuracy (needs true labels).")(f)
    return click.option("--review-share", type=click.FloatRange(0, 1), default=None,
                        help="Review queue: this share of the predictions, riskiest first (the share the lab will check).  [default: 0.10]")(f)


def _write_report(predictions: str, out_dir: str, **kw):
    """write_report, with a contradictory review choice reported as bad usage."""
    from ..evaluation.report import write_report

    try:
        return write_report(predictions, out_dir, **kw)
    except ValueError as e:
        raise UsageError(str(e)) from e


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-m", "--model", type=click.Path(exists=True, dir_okay=False), default=None, help="ONNX model file.  [default: the shipped model]")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help=f"Predictions CSV to write.  [default: {ClassifyConfig.output}]")
@click.option("--workers", type=click.IntRange(min=0), default=None, help=f"Worker processes that decode and infer (a file that crashes the decoder costs its row, not the run); 0 = all cores.  [default: {RunnerOptions.workers}]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help=f"Images per onnxruntime call (and per CSV flush).  [default: {RunnerOptions.batch_size}]")
@click.option("--provider", default=None, help=f"onnxruntime execution provider: cpu, cuda, tensorrt, openvino, or a full provider name.  [default: {RunnerOptions.provider}]")
@click.option("--threads", type=click.IntRange(min=0), default=None, help=f"onnxruntime threads per session; 0 = cores / workers.  [default: {RunnerOptions.threads}]")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: skip files already in OUTPUT (refused if another model wrote it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT instead of refusing.")
@click.option("--retry-errors", is_flag=True, help="With --resume: classify again the files whose rows are errors (e.g. after a crash or a fixed permission).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False), default=None, help="CSV with path,label columns giving the true label of inputs.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None, help="Also write an evaluation report to this folder at the end.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, log lines or summary (warnings and errors are still printed).")
@click.option("--engine", "engine_name", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="local: processes on this machine; ray: Ray actors (--workers of them; needs the ray extra).")
@click.option("--address", default=None, help="With --engine ray: the Ray cluster to join (host:port or auto).  [default: a private Ray on 127.0.0.1]")
@_review_options
def classify(inputs, model, output, workers, batch_size, provider, threads, resume, overwrite, retry_errors, labels_csv, report_dir, quiet, engine_name, address,
             review_share, target_accuracy) -> None:
    """Classify every image under INPUTS (folders, recursively, or files) into a predictions CSV.

    One row per input file, always: unreadable or corrupt files get status=error and the
    reason. Rows are flushed a batch at a time, so an interrupted run loses at most the
    batches in flight; rerun with --resume to finish it.

    Exit codes: 0 done (bad images are rows, not failures); 2 bad usage; 3 no image found
    or none could be read; 4 model unusable; 5 output unusable or resume refused;
    130 interrupted by Ctrl-C, 143 by SIGTERM (rerun with --resume).
    """
    review = _report_options(report_dir, review_share, target_accuracy, replace=overwrite or resume)
    runner = RunnerOptions(**_given(workers=workers, batch_size=batch_size, provider=provider, threads=threads))
    cfg = ClassifyConfig(
        inputs=list(inputs),
        **_given(output=output, model=model, labels_csv=labels_csv),
        runner=runner,
        resume=resume,
        retry_errors=retry_errors,
        overwrite=overwrite,
        progress="none" if quiet else "auto",
    )
    if address and engine_name != "ray":
        raise UsageError("--address is only meaningful with --engine ray")
    try:
        engine = _ray_engine(address) if engine_name == "ray" else None
        summary = run_classify(cfg, engine=engine)  # a stop inside it is its summary's, however early
    except KeyboardInterrupt:  # Ctrl-C while ray was imported: nothing was started or written
        summary = RunSummary(output=cfg.output, interrupted=True)
    warning = summary.domain_warning() if summary.files else None
    if not quiet and summary.files:  # a run that found no image wrote nothing: the error below says so
        click.echo(f"wbc-batch: {summary.line(_scores(summary))}", err=True)
    if warning:  # -q silences progress and the summary, never a warning that the results are not to be trusted
        _warn(warning)
    if summary.interrupted:
        _exit_interrupted(summary)
    require_images(summary)
    if report_dir:
        _report_after_classify(cfg.output, report_dir, quiet, review, said=warning)
    sys.exit(int(ExitCode.OK))


def _report_options(report_dir: str | None, review_share: float | None, target_accuracy: float | None, replace: bool) -> dict:
    """classify's report choices, checked before the run rather than after it: the review queue (returned as
    write_report's keywords), and a report folder that holds files only with --overwrite or --resume (which
    replace the report, as they replace or continue the CSV)."""
    review = _given(review_share=review_share, target_accuracy=target_accuracy)
    if review and not report_dir:
        raise UsageError("--review-share and --target-accuracy choose the report's review queue: give --report DIR too")
    if review:
        from ..evaluation.report_trust import ReviewPolicy

        try:
            ReviewPolicy(review_share, target_accuracy)  # contradictory choices fail before the run, not after it
        except ValueError as e:
            raise UsageError(str(e)) from e
    if report_dir:
        from ..evaluation.report import prepare_report_dir

        prepare_report_dir(report_dir, replace=replace, clear=False)
    return review


def _exit_interrupted(summary: RunSummary) -> None:
    """130 after SIGINT, 143 after SIGTERM (128 + the signal, as a shell reports it), with the resume hint; further signals are ignored."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # a late Ctrl-C must not turn a clean stop into a traceback
    click.echo("wbc-batch: interrupted; rerun the same command with --resume to finish", err=True)
    sys.exit(128 + summary.signal if summary.signal else int(ExitCode.INTERRUPTED))


def _warn(message: str) -> None:
    click.echo(f"wbc-batch: warning: {message}", err=True)


def _scores(summary: RunSummary) -> str:
    """Accuracy and macro-F1 over the rows with a true label (as the report computes them); '' without truth.

    After an interrupt they cover the rows written so far, which the line says (n of N files when the count
    of the inputs had finished), so a partial figure is not read as the run's.
    """
    if not summary.confusion:
        return ""
    import numpy as np

    from ..evaluation.metrics import metrics_from_confusion

    m = metrics_from_confusion(np.asarray(summary.confusion), summary.labels)
    share = "" if m.n == summary.ok else f" ({m.n} with a true label)"
    if summary.interrupted:
        share += f" (partial: {summary.files} of {summary.found} files)" if summary.found else f" (partial: {summary.files} files so far)"
    return f"accuracy {m.accuracy:.3f}  macro-F1 {m.macro_f1:.3f}{share}"


def _report_after_classify(predictions: str, report_dir: str, quiet: bool, review: dict, said: str | None) -> None:
    """The report of the run just written; its warnings are printed, except the domain warning the summary gave (``said``)."""

    def warn(message: str) -> None:
        if message != said:
            _warn(message)

    from ..evaluation.report import prepare_report_dir

    try:
        prepare_report_dir(report_dir, replace=True)  # checked at the run's start (_report_options)
        paths = _write_report(predictions, report_dir, on_warning=warn, **review)
    except WbcBatchError as e:
        raise WbcBatchError(f"the predictions are written ({predictions}), but the report failed: {e}", exit_code=ExitCode.OUTPUT) from e
    if not quiet:
        click.echo(f"wbc-batch: report -> {paths['html']}", err=True)


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the raw metadata JSON.")
def info(model, as_json) -> None:
    """Show what MODEL (default: the shipped model) carries: labels, input, preprocessing, provenance."""
    from ..inference.model import load_model

    m = load_model(model, threads=1)
    if as_json:
        click.echo(json.dumps(m.metadata.to_json_dict(), indent=2))
        return
    from .model_card import card_lines

    click.echo("\n".join(card_lines(m)))


@main.command()
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder to write the report to.  [default: PREDICTIONS without .csv, plus -report]")
@click.option("--group-by", "group_by", type=click.IntRange(min=0), default=None, metavar="LEVEL",
              help="Per-group differential, one group per folder at this depth under the input root (1 = first level, e.g. one folder per slide); 0 = none.  [default: 1 when the first-level folders are not class names]")
@click.option("--review-threshold", type=click.FloatRange(0, 1), default=None,
              help="Review queue: every prediction with a lower confidence (instead of --review-share).  [default: a share; 0.5 marks low confidence]")
@_review_options
@click.option("--run-dir", type=click.Path(exists=True, file_okay=False), default=None, help="Training run dir: show its curves.png (or history.csv) in the report.")
@click.option("--overwrite", is_flag=True, help="Replace the report in an output folder that holds files (its other files stay) instead of refusing.")
@click.option("--corrections", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A reviewer's path,label CSV (the report page saves it as corrections.csv; label: a model label or EXCLUDE): "
                   "adds the verified differential, overall and per group.")
def report(predictions, out_dir, group_by, review_threshold, review_share, target_accuracy, run_dir, overwrite, corrections) -> None:
    """Evaluation report for a PREDICTIONS CSV written by `classify`.

    Writes report.html (self-contained: open it offline, or mail it), metrics.json,
    per_class.csv, confusion_matrix.png, confusion_matrix_normalized.png, review.csv
    (the review queue: the riskiest predictions first) and, with
    groups, differential.csv. Accuracy, F1 and the
    confusion matrices need true labels (class-named folders or classify --labels);
    without them the report shows the predicted distribution and confidences.
    With --corrections, metrics.json's "verified" (and differential.csv's verified_
    columns) give the differential with the reviewer's labels; a correction naming a
    file that is not a classified row, or a label that is not the model's, is exit 2.
    The figures need matplotlib (pip install matplotlib); without it the
    report is written without them and a warning says so.
    """
    if out_dir is None:
        out_dir = (predictions[:-4] if predictions.lower().endswith(".csv") else predictions) + "-report"
    from ..evaluation.report import prepare_report_dir

    prepare_report_dir(out_dir, replace=overwrite)
    paths = _write_report(predictions, out_dir, group_by=group_by, run_dir=run_dir, corrections=corrections,
                          **_given(review_threshold=review_threshold, review_share=review_share, target_accuracy=target_accuracy))
    click.echo(f"wbc-batch: report -> {paths['html']}", err=True)



from .adapt import adapt_cmd  # noqa: E402  (onnx loads only when it runs)
from .calibrate import calibrate_cmd  # noqa: E402  (onnx loads only when it runs)
from .train import export_cmd, train_cmd  # noqa: E402  (click commands; torch loads only when they run)

main.add_command(train_cmd)
main.add_command(export_cmd)
main.add_command(calibrate_cmd)
main.add_command(adapt_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
