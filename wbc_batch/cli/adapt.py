"""``wbc-batch adapt``: a model fitted to a lab's own images without labels (batch-norm statistics re-measured).

Needs onnx, not torch.
"""

from __future__ import annotations

import os

import click

from ..errors import ExitCode, WbcBatchError, require_modelfile


@click.command("adapt")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The adapted model file (a new file).")
@click.option("--max-images", type=click.IntRange(min=8), default=None,
              help="Images to measure on, evenly spaced in path order.  [default: 512]")
@click.option("--name", default=None, help="The adapted model's name in its metadata (reports name the model by it).  "
                                           "[default: SOURCE-adapted-FOLDER: MODEL's name and the inputs' common folder, e.g. wbc-default-adapted-lab3]")
def adapt_cmd(model, inputs, output, max_images, name) -> None:
    """Write OUTPUT: MODEL with its batch-norm statistics re-measured on the images under INPUTS (no labels needed).

    For images from another microscope, stain or camera: classify them with the adapted model. INPUTS should be
    a lab's own cells of the usual classes in their usual mix (a few hundred; a folder of one class, or of
    non-cell images, would shift the statistics the wrong way). Labels, preprocessing, calibration and the
    domain check are kept as they were (the domain check still compares with the training labs, and flags more
    images once the network is adapted); the metadata records the adaptation ('adapted'). With labelled cells,
    fine-tuning (train --init) does better.
    """
    require_modelfile("adapt")
    from ..modelfile.adapt import DEFAULT_MAX_IMAGES, adapt_model

    if os.path.exists(output) and os.path.samefile(output, model):
        raise WbcBatchError(f"--output {output} is the model itself: write the adapted model to a new file", exit_code=ExitCode.OUTPUT)
    report = adapt_model(model, inputs, output, max_images=max_images or DEFAULT_MAX_IMAGES, name=name)
    click.echo(f"adapted {report.layers} batch norms on {report.images} images"
               + (f" ({report.skipped} unreadable skipped)" if report.skipped else "") + f" in {report.seconds:.1f} s")
    click.echo("calibration and domain check are the source model's: in_domain still means 'like the training labs', and"
               " an adapted model flags more images (measured in the model card); check accuracy on a few labelled cells")
    click.echo(f"wrote {output} (model name {report.name})")
