"""The wbc-batch metadata of an ONNX proto: read as a document, set, and the proto saved checked and atomically.

Every step that edits a model (export, calibration, adaptation, quantisation) holds the proto in memory,
edits the JSON document (:func:`metadata_doc`, :func:`set_metadata`) and writes the file once
(:func:`save_checked`). Other ``metadata_props`` keys are kept; a failed check leaves the file as it was.
The typed, checked contract is :func:`wbc_batch.inference.model.read_metadata`; the document here is the
raw JSON, so an edit keeps every section as it was written, those this version does not know included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import onnx.helper

from ..errors import ExitCode, WbcBatchError
from ..inference.metadata import METADATA_KEY


def metadata_doc(proto: onnx.ModelProto) -> dict:
    """The wbc-batch metadata document of a model proto, as written (raises KeyError naming the key when absent)."""
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
