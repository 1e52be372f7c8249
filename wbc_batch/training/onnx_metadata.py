"""One way to change the wbc-batch metadata of an ONNX file: load, edit the JSON, check, save atomically.

Export writes it first, metric embedding and quantisation (and any later step that adds a
record, such as calibration) edit it; each used to repeat the load-proto/edit/save sequence.
Other ``metadata_props`` keys are kept; a failed check leaves the file as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx.helper

from ..errors import ExitCode, WbcBatchError
from ..inference.metadata import METADATA_KEY


def read_metadata(proto: onnx.ModelProto) -> dict:
    """The wbc-batch metadata document of a model proto (raises KeyError naming the key when absent)."""
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    raise KeyError(f"the model carries no {METADATA_KEY!r} metadata")


def set_metadata(proto: onnx.ModelProto, doc: dict) -> None:
    """Store ``doc`` as the wbc-batch metadata, in place; other keys stay, in their order."""
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = json.dumps(doc)
    onnx.helper.set_metadata_props(proto, props)


def save_checked(proto: onnx.ModelProto, path: str | os.PathLike[str], *, full_check: bool = False) -> None:
    """``onnx.checker`` first, then write beside ``path`` and rename: readers never see half a file."""
    onnx.checker.check_model(proto, full_check=full_check)
    tmp = Path(str(path) + ".tmp")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a file where a folder should be, no permission: say so, leave nothing half-written
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise WbcBatchError(f"cannot write the model to {path}: {e.strerror or e}", exit_code=ExitCode.OUTPUT) from e


def rewrite_metadata(
    path: str | os.PathLike[str],
    edit: Callable[[dict], dict],
    *,
    output: str | os.PathLike[str] | None = None,
    ir_version: int | None = None,
    full_check: bool = False,
) -> Path:
    """Load ``path``, replace its metadata by ``edit(metadata)``, check, save to ``output`` (default: in place).

    ``ir_version`` pins the file's IR version (tools such as the quantiser raise it).
    """
    proto = onnx.load(str(path))
    if ir_version is not None:
        proto.ir_version = ir_version
    set_metadata(proto, edit(read_metadata(proto)))
    out = Path(output or path)
    save_checked(proto, out, full_check=full_check)
    return out
