"""wbc_batch.modelfile.proto: the one way a step edits a model's metadata (read the document, set it, save checked); onnx only, no torch."""

from __future__ import annotations

import json

import pytest
from conftest import LABELS, build_color_model

onnx = pytest.importorskip("onnx")

from wbc_batch.errors import ExitCode, WbcBatchError  # noqa: E402
from wbc_batch.inference.metadata import METADATA_KEY  # noqa: E402
from wbc_batch.inference.model import load_model, read_metadata  # noqa: E402
from wbc_batch.modelfile.proto import metadata_doc, save_checked, set_metadata  # noqa: E402


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_set_metadata_edits_only_the_wbc_batch_document(tmp_path):
    path = build_color_model(tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="other", value="kept")
    graph_before = proto.graph.SerializeToString()

    set_metadata(proto, {**metadata_doc(proto), "note": {"a": 1}})
    save_checked(proto, path)
    after = onnx.load(str(path))
    assert after.graph.SerializeToString() == graph_before
    assert list(_props(path)) == [METADATA_KEY, "other"] and _props(path)["other"] == "kept"
    doc = metadata_doc(after)
    assert doc["note"] == {"a": 1} and doc["labels"] == list(LABELS)
    assert load_model(path).metadata.name == "color-test"  # still a valid wbc-batch model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left


def test_metadata_doc_is_the_document_as_written_and_read_metadata_its_checked_contract(tmp_path):
    proto = onnx.load(str(build_color_model(tmp_path / "m.onnx")))
    doc = metadata_doc(proto)
    assert doc == json.loads(_props(tmp_path / "m.onnx")[METADATA_KEY])
    assert read_metadata(proto).to_json_dict() == doc and read_metadata(proto).labels == LABELS


def test_save_checked_creates_the_folder_and_a_failed_check_leaves_the_file_as_it_was(tmp_path):
    path = build_color_model(tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    save_checked(proto, tmp_path / "sub" / "copy.onnx")
    assert (tmp_path / "sub" / "copy.onnx").read_bytes() == proto.SerializeToString()
    before = path.read_bytes()
    proto.ir_version = 1  # IR 1 cannot hold opset 18
    with pytest.raises(onnx.checker.ValidationError):
        save_checked(proto, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "sub"]


def test_an_unwritable_output_is_an_output_error(tmp_path):
    proto = onnx.load(str(build_color_model(tmp_path / "m.onnx")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(WbcBatchError, match="cannot write the model to") as e:
        save_checked(proto, tmp_path / "file" / "m.onnx")
    assert e.value.exit_code == ExitCode.OUTPUT


def test_a_model_without_metadata_is_named(tmp_path):
    proto = onnx.load(str(build_color_model(tmp_path / "bare.onnx", metadata=None)))
    with pytest.raises(KeyError, match=METADATA_KEY):
        metadata_doc(proto)
