"""``wbc-batch calibrate``: add (or fit anew) calibrated probabilities and a domain check in any exported model.

Needs onnx, not torch: a lab can upgrade a model file it was given
without the run folder it came from.
"""

from __future__ import annotations

import click

from ..errors import ExitCode, WbcBatchError, require_modelfile


@click.command("calibrate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--reference-dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="The model's training images (CLASS/ folders): what 'in domain' means.")
@click.option("--calibration-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Held-out labelled images from the same labs (CLASS/ folders; never the test set): fits the temperature "
                   "and places the domain threshold.  [default: none: temperature 1, threshold from the reference]")
@click.option("--in-domain-quantile", type=click.FloatRange(0.5, 1.0), default=None,
              help="Share of held-out in-domain images the domain check must pass.  [default: 0.995]")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The new model file.")
def calibrate_cmd(model, reference_dir, calibration_dir, in_domain_quantile, output) -> None:
    """Write OUTPUT: MODEL with calibrated probabilities and an ood_score output, fitted from class folders.

    classify then writes ood_score and in_domain columns and warns when a run holds many images unlike
    the training data. The graph must end in Softmax(Gemm(features)), as every wbc-batch export does.
    A MODEL that already carries a temperature and a check (every export, the shipped models) is
    fitted anew from its bare network.
    """
    require_modelfile("calibrate")
    from ..modelfile.calibrate import DEFAULT_IN_DOMAIN_QUANTILE, calibrate_model, trust_lines

    try:
        sections = calibrate_model(model, reference_dir, output, calibration_dir=calibration_dir,
                                   quantile=in_domain_quantile or DEFAULT_IN_DOMAIN_QUANTILE)
    except ValueError as e:
        raise WbcBatchError(str(e), exit_code=ExitCode.USAGE) from e
    click.echo("\n".join([*trust_lines(sections), f"wrote {output}"]))
