"""One base exception for everything that stops a wbc-batch run, carrying the exit code it means.

Why: the library raises specific errors (a model that cannot be used, an output that cannot be
written, a labels file with a bad line, ...) and the ``wbc-batch`` command must turn each into a
message and an exit code. Each error says its own code (as click's ``ClickException`` does), so
the CLI catches :class:`WbcBatchError` once instead of keeping an ``except`` ladder in step with
the library. The subclasses live beside the code that raises them (``ModelError`` in
``inference.metadata``, ``OutputError`` in ``inference.predictions``, ...).

Not in this hierarchy: ``inference.preprocess.ImageError``. An image that cannot be decoded is a
*row* (status ``error`` with its reason), never a failed run, so it must not be caught as one.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the ``wbc-batch`` command (documented in ``wbc-batch classify --help`` and the README)."""

    OK = 0
    FAILURE = 1  # the run could not finish (e.g. the Ray cluster failed)
    USAGE = 2  # bad options or inputs (click's own usage errors use 2 as well)
    NO_IMAGES = 3  # no image found, or none could be read
    MODEL = 4  # the model file is unusable
    OUTPUT = 5  # the output cannot be written, or --resume was refused
    INTERRUPTED = 130  # Ctrl-C: rerun with --resume


class WbcBatchError(Exception):
    """A run cannot start or finish; ``str(e)`` says why in words for the user, ``exit_code`` for the shell."""

    exit_code: int = ExitCode.FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(WbcBatchError):
    """Options that contradict each other or cannot apply (e.g. --resume with --overwrite)."""

    exit_code = ExitCode.USAGE


#: The smallest install that provides each optional package, in a form that works for a user of this
#: repository: wbc-batch is not on PyPI, so ``pip install 'wbc-batch[extra]'`` resolves nothing, and an
#: extra would pull more than the command needs (the train extra is 5.7 GB of CUDA torch where a command
#: needs only onnx).
INSTALL = {
    "onnx": "pip install onnx",
    "torch": "pip install '.[train]' in the wbc-batch checkout "
             "(on a machine without a GPU, first pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu)",
    "matplotlib": "pip install matplotlib",
    "ray": "pip install 'ray[data]'",
}


def require(module: str, why: str) -> None:
    """Import ``module``, or stop with a usage error: ``why`` (what needs it), then the install that provides it.

    Why here: every command that needs an optional package says so the same way, from the one table above.
    """
    from importlib import import_module

    try:
        import_module(module)
    except ImportError:
        raise UsageError(f"{why}: {INSTALL[module]}") from None


def require_modelfile(command: str) -> None:
    """Stop a command that reads and rewrites a model file (:mod:`wbc_batch.modelfile`) where onnx is missing.

    Why its own function: that package needs onnx on top of the inference install and never torch, so the
    hint is ``pip install onnx`` whichever command it is; ``tests/test_layout.py`` holds both to it.
    """
    require("onnx", f"{command} needs onnx (not torch)")
