"""wbc_batch.inference.metadata: the JSON contract a model file carries, and its validation."""

from __future__ import annotations

import json
import re

import pytest
from conftest import LABELS

from wbc_batch.inference.metadata import METADATA_KEY, ModelError, ModelMetadata
from wbc_batch.inference.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec


def _md(**kw) -> ModelMetadata:
    return ModelMetadata(**{"labels": LABELS, "height": 24, "width": 32, **kw})


def test_json_document_layout():
    d = _md(name="n", arch="a", extra={"metrics": {"f1": 0.9}}).to_json_dict()
    assert d == {
        "schema_version": 1,
        "name": "n",
        "arch": "a",
        "labels": list(LABELS),
        "input": {"name": "image", "layout": "NHWC", "dtype": "uint8", "height": 24, "width": 32, "channels": 3, "color": "RGB"},
        "preprocess": {"resize": "bilinear", "jpeg_draft": True, "max_pixels": DEFAULT_MAX_PIXELS, "keep_aspect": False, "normalization": "inside the graph"},
        "output": {"name": "probabilities", "kind": "probabilities"},
        "metrics": {"f1": 0.9},
    }
    assert _md(dtype="float32").to_json_dict()["preprocess"]["normalization"] == "none"


def test_props_round_trip_keeps_everything():
    md = _md(
        input_name="x", layout="NCHW", dtype="float32", resize="bicubic", jpeg_draft=False, max_pixels=123,
        output_name="logits", output_kind="logits", name="wbcnet", arch="resnet", extra={"data": {"sha": "abc"}, "n": 3},
    )
    props = md.to_props()
    assert list(props) == [METADATA_KEY]
    assert ModelMetadata.from_props(props) == md


def test_preprocess_spec_from_metadata():
    assert _md(resize="box", jpeg_draft=False, max_pixels=99).preprocess == PreprocessSpec(24, 32, "box", False, 99)


def test_labels_become_a_tuple_and_replace_validates():
    md = ModelMetadata(labels=["A", "B"], height=1, width=2)
    assert md.labels == ("A", "B")
    assert md.replace(height=7).height == 7 and md.height == 1
    with pytest.raises(ModelError, match="at least two labels"):
        md.replace(labels=("A",))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"labels": ("A",)}, "at least two labels are needed"),
        ({"labels": ("A", "B", "A")}, r"labels repeat: \['A', 'B', 'A'\]"),
        ({"labels": ("A", "")}, "labels must be non-empty strings"),
        ({"layout": "HWC"}, r"layout 'HWC' not in \('NHWC', 'NCHW'\)"),
        ({"dtype": "float16"}, "dtype 'float16' not in"),
        ({"color": "BGR"}, "colour order 'BGR' unsupported"),
        ({"output_kind": "scores"}, "output kind 'scores' not in"),
        ({"height": 0}, "input size 0x32 is not positive integers"),
        ({"width": 2.5}, "input size 24x2.5 is not positive integers"),
    ],
)
def test_invalid_metadata(kw, message):
    with pytest.raises(ModelError, match="^invalid model metadata: .*" + message):
        _md(**kw)


def test_all_problems_are_listed_at_once():
    with pytest.raises(ModelError) as e:
        _md(labels=("A",), layout="X", dtype="Y")
    assert str(e.value).count(";") == 2


def test_missing_metadata_is_an_error_not_a_guess():
    with pytest.raises(ModelError, match="the model carries no 'wbc_batch' metadata .*export it with 'wbc-batch export'"):
        ModelMetadata.from_props({"other": "{}"})


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "metadata is not valid JSON"),
        ("[1, 2]", "metadata is not a JSON object"),
    ],
)
def test_unparseable_metadata(raw, message):
    with pytest.raises(ModelError, match=message):
        ModelMetadata.from_props({METADATA_KEY: raw})


def _doc(**changes) -> dict:
    d = _md().to_json_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "doc, message",
    [
        (_doc(schema_version=2), "metadata schema_version 2 is not supported \\(expected 1\\)"),
        ({k: v for k, v in _doc().items() if k != "schema_version"}, "schema_version None is not supported"),
        ({k: v for k, v in _doc().items() if k != "input"}, "invalid model metadata: missing or malformed field 'input'"),
        ({k: v for k, v in _doc().items() if k != "labels"}, "missing or malformed field 'labels'"),
        (_doc(input={**_doc()["input"], "channels": 1}), "only 3-channel inputs are supported, metadata says 1"),
        (_doc(input={**_doc()["input"], "height": "tall"}), "missing or malformed field"),
        (_doc(output="probabilities"), "missing or malformed field"),
        (_doc(labels=["A", "A"]), "labels repeat"),
    ],
)
def test_malformed_documents(doc, message):
    with pytest.raises(ModelError, match=message):
        ModelMetadata.from_props({METADATA_KEY: json.dumps(doc)})


@pytest.mark.parametrize(
    "labels, message",
    [
        ("ABCD", "labels must be a list of class names, got a string: 'ABCD'"),
        ({"A": 0, "B": 1}, r"labels must be a list of class names, got an object: \{'A': 0, 'B': 1\}"),
        (None, "labels must be a list of class names, got null"),
        ([["A"], ["B"]], r"labels must be non-empty strings, got \[\['A'\], \['B'\]\]"),
        (["A", 2], r"labels must be non-empty strings, got \['A', 2\]"),
        (["A", "=HYPERLINK(1)"], r"labels may not start with = \+ - @ TAB or CR \(a spreadsheet runs such a cell\): \['=HYPERLINK\(1\)'\]"),
        (["-B", "@C"], r"labels may not start with .*: \['-B', '@C'\]"),
    ],
)
def test_labels_must_be_a_list_of_names(labels, message):
    """A string of labels is not read as one class per character (nor an object as its keys): the model is refused."""
    with pytest.raises(ModelError, match="^invalid model metadata: " + message + "$"):
        ModelMetadata.from_props({METADATA_KEY: json.dumps(_doc(labels=labels))})


def test_labels_given_as_a_string_in_python_are_refused():
    with pytest.raises(ModelError, match="^invalid model metadata: labels must be a list of class names, got a string: 'AB'$"):
        ModelMetadata(labels="AB", height=1, width=2)


def test_optional_fields_default():
    doc = {"schema_version": 1, "labels": ["A", "B"], "input": {"name": "img", "height": 8, "width": 9}, "output": {"name": "p"}}
    md = ModelMetadata.from_json_dict(doc)
    assert md == ModelMetadata(labels=("A", "B"), height=8, width=9, input_name="img", output_name="p")
    assert md.extra == {} and md.resize == "bilinear" and md.jpeg_draft is True and md.max_pixels == DEFAULT_MAX_PIXELS


def test_keep_aspect_round_trips_and_reaches_the_spec():
    md = ModelMetadata(labels=("A", "B"), height=240, width=320, keep_aspect=True)
    d = md.to_json_dict()
    assert d["preprocess"]["keep_aspect"] is True and "pad" in d["preprocess"]
    back = ModelMetadata.from_json_dict(d)
    assert back == md and back.preprocess.keep_aspect is True
    old = ModelMetadata(labels=("A", "B"), height=240, width=320).to_json_dict()
    assert old["preprocess"]["keep_aspect"] is False and "pad" not in old["preprocess"]


def test_domain_section_is_read_into_typed_fields():
    from wbc_batch.inference.metadata import DomainCheck

    md = ModelMetadata(labels=LABELS, height=8, width=8, extra={"domain": {"output": "ood_score", "threshold": 1.5, "method": "m"}})
    assert md.domain == DomainCheck("ood_score", 1.5)
    assert ModelMetadata(labels=LABELS, height=8, width=8).domain is None  # an older model: no check
    again = ModelMetadata.from_json_dict(json.loads(json.dumps(md.to_json_dict())))
    assert again.domain == md.domain and again.to_json_dict()["domain"]["method"] == "m"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ([], "the 'domain' section is not a JSON object"),
        ({"threshold": 1.0}, "domain.output must name a graph output, got None"),
        ({"output": "", "threshold": 1.0}, "domain.output must name a graph output, got ''"),
        ({"output": "ood_score"}, "domain.threshold must be a finite number, got None"),
        ({"output": "ood_score", "threshold": "2"}, "domain.threshold must be a finite number, got '2'"),
        ({"output": "ood_score", "threshold": float("nan")}, "domain.threshold must be a finite number, got nan"),
        ({"output": "ood_score", "threshold": True}, "domain.threshold must be a finite number, got True"),
        ({"output": "probabilities", "threshold": 1.0}, "domain.output 'probabilities' is the probabilities output"),
    ],
)
def test_malformed_domain_section_is_a_model_error(section, message):
    with pytest.raises(ModelError, match=re.escape(message)):
        ModelMetadata(labels=LABELS, height=8, width=8, extra={"domain": section})
